"""`lora inspect|merge|extract|convert` commands."""
from __future__ import annotations


def register(sub) -> None:
    """Placeholder until the LoRA engine lands: no commands yet."""
