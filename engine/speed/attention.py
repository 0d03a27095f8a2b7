"""Attention backend per device through diffusers' dispatcher (`ModelMixin.set_attention_backend`).

`choose_attention` is pure policy over what is installed; `usable_backends` asks diffusers which kernels
import; `apply_attention` sets the backend on the experts after one tiny test call on the real device,
so a kernel that imports but does not run on this GPU falls back with a reason instead of failing mid-run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from engine.speed.options import ATTENTION_BACKENDS

log = logging.getLogger(__name__)

# Fastest first where several are installed. sage quantizes QK to INT8 (the usual choice in Wan front ends);
# benchmarks/step_cost.py --gpu times each installed backend on the real 1.3B shape to check this order.
AUTO_ORDER_CUDA = ("sage", "flash_3", "flash", "xformers", "native")
CUDA_ONLY = {"flash": (8, 0), "flash_3": (9, 0), "sage": (8, 0), "xformers": (7, 0)}


@dataclass(frozen=True)
class DeviceInfo:
    """The compute device as the speed policy sees it (no torch objects, so tests build it directly)."""

    type: str  # "cuda" or "cpu"
    capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (8, 9) for Ada
    name: str = ""

    @classmethod
    def capture(cls, device=None) -> "DeviceInfo":
        import torch

        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(device)
        if device.type == "cuda":
            return cls("cuda", tuple(torch.cuda.get_device_capability(device)), torch.cuda.get_device_name(device))
        return cls(device.type)


@dataclass(frozen=True)
class AttentionPlan:
    backend: str  # one of ATTENTION_BACKENDS
    requested: str  # "auto" or a backend name
    reason: str  # one line for the plan: why this backend (and why not the one asked for)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "requested": self.requested, "reason": self.reason}


def usable_backends() -> dict[str, str | None]:
    """Backend -> None when diffusers can use it here, else why not (package missing or too old)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    out: dict[str, str | None] = {}
    for name, value in ATTENTION_BACKENDS.items():
        try:
            _check_attention_backend_requirements(AttentionBackendName(value))
            out[name] = None
        except (RuntimeError, ImportError, ValueError) as e:
            out[name] = _short_requirement(str(e))
    return out


def _short_requirement(message: str) -> str:
    """diffusers' 'not usable because of missing package ... Please install `pkg>=v`.' -> 'not installed (pkg>=v)'."""
    import re

    if "missing package" in message or "not usable" in message:
        wanted = re.search(r"install `(?:pip install )?([^`]+)`", message)
        return f"not installed ({wanted.group(1)})" if wanted else "not installed"
    return _first_line(Exception(message))


def _device_problem(name: str, device: DeviceInfo) -> str | None:
    need = CUDA_ONLY.get(name)
    if need is None:
        return None
    if device.type != "cuda":
        return "needs a CUDA GPU"
    if device.capability is not None and tuple(device.capability) < need:
        return f"needs compute capability {need[0]}.{need[1]}+, this GPU has {device.capability[0]}.{device.capability[1]}"
    return None


def candidates(requested: str, device: DeviceInfo, usable: dict[str, str | None]) -> list[tuple[str, str]]:
    """Backends to try in order, each with its one-line reason for the plan; native SDPA always comes last."""
    if requested != "auto":
        problem = _device_problem(requested, device) or usable.get(requested)
        if problem is not None:
            return [("native", f"native SDPA instead of {requested}: {requested} {problem}")]
        if requested == "native":
            return [("native", "native SDPA (asked for)")]
        return [(requested, f"{requested} (asked for)"), ("native", f"native SDPA: {requested} failed its test call")]
    if device.type != "cuda":
        return [("native", f"native SDPA: the attention backend for a {device.type.upper()}")]
    where = device.name or "this GPU"
    out, missing = [], []
    for name in AUTO_ORDER_CUDA:
        problem = _device_problem(name, device) or usable.get(name)
        if problem is not None:
            missing.append(f"{name} {problem}")
            continue
        why = f"{name}: the fastest usable backend on {where}"
        out.append((name, why + (f" ({', '.join(missing)})" if missing else "")))
    return out


def choose_attention(requested: str, device: DeviceInfo, usable: dict[str, str | None]) -> AttentionPlan:
    """The backend this run plans to use; `apply_attention` may still fall back after its test call."""
    name, reason = candidates(requested, device, usable)[0]
    return AttentionPlan(name, requested, reason)


def apply_attention(transformers, requested: str, device, usable: dict[str, str | None] | None = None,
                    probe=None) -> AttentionPlan:
    """Set the first backend that passes a test call on `device` on every expert; native is the last resort."""
    import torch

    info = DeviceInfo.capture(device)
    usable = usable_backends() if usable is None else usable
    dtype = next(iter(transformers)).dtype if transformers else torch.float32
    probe = probe or _probe
    failures: list[str] = []
    for name, reason in candidates(requested, info, usable):
        if name != "native":
            problem = probe(name, torch.device(device), dtype)
            if problem:
                failures.append(f"{name} failed its test call ({problem})")
                continue
        _set(transformers, name)
        if failures:
            reason = f"{name}: " + "; ".join(failures)
            log.warning("attention: %s", reason)
        return AttentionPlan(name, requested, reason)
    raise AssertionError("native attention is always a candidate")  # pragma: no cover


def _set(transformers, name: str) -> None:
    value = ATTENTION_BACKENDS[name]
    for module in transformers:
        current = getattr(module, "_wanstack_attention", None)
        if current == value:
            continue
        _quiet_experimental_warning()
        module.set_attention_backend(value)
        module._wanstack_attention = value


def _probe(name: str, device, dtype) -> str | None:
    """Run the backend once on a small (batch, tokens, heads, head_dim) problem; None when it works."""
    import torch
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    if dtype == torch.float32 and device.type == "cuda":
        dtype = torch.bfloat16  # the GPU kernels take half precision; our CUDA experts are bf16
    q, k, v = (torch.randn(1, 64, 2, 64, device=device, dtype=dtype) for _ in range(3))
    try:
        out = dispatch_attention_fn(q, k, v, backend=AttentionBackendName(ATTENTION_BACKENDS[name]))
        if not torch.isfinite(out).all():
            return "non-finite output"
    except Exception as e:  # noqa: BLE001 - any kernel failure means: use the next backend
        return _first_line(e)
    return None


def _quiet_experimental_warning() -> None:
    """set_attention_backend warns 'experimental' on every call; once per process in our log is enough."""
    import diffusers.models.modeling_utils as mu

    mu.logger.setLevel(max(mu.logger.level, logging.ERROR))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
