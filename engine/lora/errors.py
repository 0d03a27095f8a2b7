"""Errors of the LoRA engine; each message names the file, the problem and the fix."""
from __future__ import annotations

from engine.types import WanStackError


class LoraFormatError(WanStackError):
    """A LoRA file cannot be read or holds nothing we can apply (bad file, pickle, DoRA, NaN, no known keys)."""


class LoraIncompatibleError(WanStackError):
    """A LoRA was made for another base model (different width) or expert layout."""


class LoraCapExceeded(WanStackError):
    """More enabled LoRAs act on one expert than the model type's cap allows."""
