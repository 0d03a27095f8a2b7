"""Memory errors meant for the user."""
from __future__ import annotations

from engine.types import WanStackError


class NotEnoughMemory(WanStackError):
    """A run does not fit even with the heaviest offload; the message names what was tried and what to lower."""

    def __init__(self, message: str, tried: tuple[str, ...] = ()):
        super().__init__(message)
        self.tried = tuple(tried)
