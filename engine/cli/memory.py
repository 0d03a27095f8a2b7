"""`vram` and `plan` commands (memory governor)."""
from __future__ import annotations


def register(sub) -> None:
    """Placeholder until the memory governor lands: no commands yet."""
