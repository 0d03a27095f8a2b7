"""Validate a GenerationRequest against its model's catalog spec and fill in the defaults.

Runs before anything heavy. Errors name the field, the value and the fix.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from engine.catalog import ModelSpec
from engine.types import OFFLOAD_CHOICES, GenerationRequest, RequestError

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Resolved:
    """The effective settings of one run: every default filled in, the seed drawn if it was random."""

    width: int
    height: int
    frames: int
    fps: int
    steps: int
    guidance: float
    guidance_2: float | None
    seed: int
    shift: float


def _int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise RequestError(f"{name} {value!r} must be a whole number")
    value = int(value)
    if not low <= value <= high:
        raise RequestError(f"{name} {value} must be between {low} and {high}")
    return value


def _float(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RequestError(f"{name} {value!r} must be a number")
    if not low <= value <= high:
        raise RequestError(f"{name} {value} must be between {low:g} and {high:g}")
    return float(value)


def resolve_request(req: GenerationRequest, spec: ModelSpec) -> Resolved:
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise RequestError("prompt is empty; describe the video you want")
    if req.offload not in OFFLOAD_CHOICES:
        raise RequestError(f"offload {req.offload!r} must be one of {', '.join(OFFLOAD_CHOICES)}")
    m = spec.size_multiple
    width = _int("width", spec.width if req.width is None else req.width, m, 4096)
    height = _int("height", spec.height if req.height is None else req.height, m, 4096)
    for name, value in (("width", width), ("height", height)):
        if value % m:
            raise RequestError(f"{name} {value} must be a multiple of {m} for {spec.type} (try {value // m * m or m})")
    frames = _int("frames", spec.frames if req.frames is None else req.frames, 1, 1001)
    if (frames - 1) % 4:
        nearest = (frames - 1) // 4 * 4 + 1
        raise RequestError(f"frames {frames} must be 4k+1 (e.g. {nearest} or {nearest + 4})")
    if spec.task == "i2v" and not req.image:
        raise RequestError(f"image is required: {spec.label} makes a video from a start image")
    if spec.task == "t2v" and req.image:
        raise RequestError(f"image is not used by {spec.label} (text-to-video); remove it or pick an I2V/TI2V model")
    seed = secrets.randbelow(MAX_SEED + 1) if req.seed is None or req.seed < 0 else _int("seed", req.seed, 0, MAX_SEED)
    guidance_2 = None
    if spec.dual_expert:
        g2 = spec.guidance_2 if req.guidance_2 is None else req.guidance_2
        guidance_2 = _float("guidance_2", g2, 0.0, 30.0)
    return Resolved(
        width=width,
        height=height,
        frames=frames,
        fps=_int("fps", spec.fps if req.fps is None else req.fps, 1, 120),
        steps=_int("steps", spec.steps if req.steps is None else req.steps, 1, 200),
        guidance=_float("guidance", spec.guidance if req.guidance is None else req.guidance, 0.0, 30.0),
        guidance_2=guidance_2,
        seed=seed,
        shift=_float("shift", spec.shift if req.shift is None else req.shift, 0.1, 50.0),
    )
