"""LoRA engine: read every Wan LoRA family, report coverage per expert, merge stacks exactly in place.

`from engine.lora import LoraManager` is the public entry point. Importing this package does not
import torch; the submodules that need it import it when used.
"""
from __future__ import annotations

from engine.lora.errors import LoraCapExceeded, LoraFormatError, LoraIncompatibleError

__all__ = ["LoraManager", "LoraFormatError", "LoraIncompatibleError", "LoraCapExceeded"]


def __getattr__(name: str):
    if name == "LoraManager":
        from engine.lora.manager import LoraManager

        return LoraManager
    raise AttributeError(f"module 'engine.lora' has no attribute {name!r}")
