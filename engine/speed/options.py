"""What a person asks for (attention backend, compile, step cache), validated at the engine's door. Torch-free."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from engine.types import RequestError

# Our names -> diffusers' AttentionBackendName values. Hub-kernel backends are left out: they download.
ATTENTION_BACKENDS = {
    "native": "native",      # torch SDPA (picks flash / memory-efficient / math kernels itself)
    "flash": "flash",        # flash-attn 2
    "flash_3": "_flash_3",   # flash-attn 3 (Hopper)
    "sage": "sage",          # sageattention (INT8 QK)
    "xformers": "xformers",
    "flex": "flex",          # torch flex_attention
}
ATTENTION_CHOICES = ("auto", *ATTENTION_BACKENDS)
COMPILE_CHOICES = ("auto", "on", "off")
# diffusers ships First-Block cache with Wan's block layout registered (hooks/_helpers.py).
CACHE_CHOICES = ("off", "first_block")
DEFAULT_CACHE_THRESHOLD = {"first_block": 0.05}
MIN_CACHE_STEPS = 10  # below this every step matters too much for a cache to help (distilled 4-8 step runs)


@dataclass(frozen=True)
class SpeedOptions:
    """`auto` attention/compile defer to the app's flags, then to the device (see engine.speed.plan)."""

    attention: str = "auto"
    compile: str = "auto"
    cache: str = "off"
    cache_threshold: float | None = None
    fp8_compute: bool = False  # fp8 x fp8 matmuls for fp8-stored experts on Ada/Hopper (engine/speed/fp8.py)

    def __post_init__(self):
        for name, allowed in (("attention", ATTENTION_CHOICES), ("compile", COMPILE_CHOICES), ("cache", CACHE_CHOICES)):
            value = getattr(self, name)
            if value not in allowed:
                raise RequestError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        t = self.cache_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t != t or not 0 < t <= 1):
            raise RequestError(f"cache_threshold {t!r} must be a number in (0, 1], e.g. 0.05 (higher skips more)")
        if not isinstance(self.fp8_compute, bool):
            raise RequestError(f"fp8_compute {self.fp8_compute!r} must be true or false")

    @property
    def threshold(self) -> float | None:
        if self.cache == "off":
            return None
        return float(self.cache_threshold if self.cache_threshold is not None else DEFAULT_CACHE_THRESHOLD[self.cache])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SpeedOptions":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise RequestError(f"speed options must be an object like {{\"attention\": \"auto\"}}, got {d!r}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise RequestError(f"unknown speed option(s) {sorted(unknown)}; allowed: attention, compile, cache, cache_threshold, fp8_compute")
        return cls(**d)
