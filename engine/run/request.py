"""Validate a GenerationRequest against its model's catalog spec and fill in the defaults.

Runs before anything heavy. Errors name the field, the value and the fix.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from engine.models.catalog import ModelSpec
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


MAX_PROMPT_CHARS = 10_000  # Wan's text encoder reads 512 tokens; this bounds what a client can send


def check_geometry(spec: ModelSpec, width, height, frames, flag: str = "") -> tuple[int, int, int]:
    """The one size and frame rule (the request and `engine plan` share it): defaults filled in, width and
    height multiples of the model's size multiple, frames 4k+1. `flag` prefixes names ("--" on the CLI)."""
    m = spec.size_multiple
    width = _int(f"{flag}width", spec.width if width is None else width, m, 4096)
    height = _int(f"{flag}height", spec.height if height is None else height, m, 4096)
    for name, value in ((f"{flag}width", width), (f"{flag}height", height)):
        if value % m:
            raise RequestError(f"{name} {value} must be a multiple of {m} for {spec.type} (try {value // m * m or m})")
    frames = _int(f"{flag}frames", spec.frames if frames is None else frames, 1, 1001)
    if (frames - 1) % 4:
        nearest = (frames - 1) // 4 * 4 + 1
        raise RequestError(f"{flag}frames {frames} must be 4k+1 (e.g. {nearest} or {nearest + 4})")
    return width, height, frames


def resolve_request(req: GenerationRequest, spec: ModelSpec) -> Resolved:
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise RequestError("prompt is empty; describe the video you want")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is not None and not isinstance(text, str):
            raise RequestError(f"{name} must be text")
        if text and len(text) > MAX_PROMPT_CHARS:
            raise RequestError(f"{name} is {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted "
                               "(the text encoder reads about 512 tokens)")
    if req.offload not in OFFLOAD_CHOICES:
        raise RequestError(f"offload {req.offload!r} must be one of {', '.join(OFFLOAD_CHOICES)}")
    width, height, frames = check_geometry(spec, req.width, req.height, req.frames)
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


def check_model_limits(r: Resolved, spec: ModelSpec, transformer_config: dict | None) -> None:
    """Sizes the model itself cannot run (past its rotary position table), refused before any torch work."""
    if not transformer_config:
        return
    max_positions = transformer_config.get("rope_max_seq_len")
    patch = transformer_config.get("patch_size") or spec.memory.patch
    if not isinstance(max_positions, int) or not isinstance(patch, (list, tuple)) or len(patch) != 3:
        return
    mem = spec.memory
    axes = (("frames", r.frames, (r.frames - 1) // mem.vae_temporal + 1, patch[0], mem.vae_temporal),
            ("height", r.height, r.height // mem.vae_spatial, patch[1], mem.vae_spatial),
            ("width", r.width, r.width // mem.vae_spatial, patch[2], mem.vae_spatial))
    for name, value, latent, p, stride in axes:
        if latent // p > max_positions:
            if name == "frames":
                largest = (max_positions * p - 1) * stride + 1
            else:
                largest = max_positions * p * stride // spec.size_multiple * spec.size_multiple
            raise RequestError(f"{name} {value} is more than {spec.label} can run (at most {largest}: "
                               f"{max_positions} positions per axis); lower {name} to {largest} or less")


IGNORE_PLAN_HINT = ("or, to try anyway, pass --ignore-memory-plan (app and `engine generate`) "
                    "or set ignore_memory_plan in the request")


def refuse_unfit(plan, spec: ModelSpec, r: Resolved, n_loras: int, snapshot, choice: str, reserve_bytes: int,
                 dtype: str | None, storage: str | None = None, text_encoder_storage: str | None = None) -> None:
    """Raise NotEnoughMemory, before any work, for a run the memory plan says cannot fit; the message gives
    the plan's reason and the largest frame count that would fit at this size (or says to lower the size)."""
    if plan.fits:
        return
    from engine.memory import plan_for
    from engine.memory.errors import NotEnoughMemory

    def fits(frames: int, height: int, width: int) -> bool:
        return plan_for(spec, height, width, frames, loras=n_loras, snapshot=snapshot, choice=choice,
                        reserve_bytes=reserve_bytes, dtype=dtype, storage=storage,
                        text_encoder_storage=text_encoder_storage).fits

    lo, hi = 0, (r.frames - 1) // 4  # frames = 4k+1; find the largest k that fits
    if fits(1, r.height, r.width):
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(4 * mid + 1, r.height, r.width):
                lo = mid
            else:
                hi = mid - 1
        lower = f"lower frames to {4 * lo + 1} or less at {r.width}x{r.height}, or lower the resolution"
    else:
        lower = f"even 1 frame at {r.width}x{r.height} does not fit: lower the resolution"
    why = next((x for x in plan.reasons if "needs" in x.lower()), plan.reasons[0] if plan.reasons else "no plan fits")
    raise NotEnoughMemory(f"this run cannot fit in memory: {why}. "
                          f"To run it, {lower}; {IGNORE_PLAN_HINT}.", tried=(plan.mode.value,))
