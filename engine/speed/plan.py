"""One run's speed plan (attention, compile, step cache) from the request, the app's defaults and the device,
and applying it to the loaded experts. The plan is made before loading, so the UI shows it with the memory plan.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.speed.attention import AttentionPlan, DeviceInfo, apply_attention, choose_attention
from engine.speed.cache import CachePlan, choose_cache
from engine.speed.compile import CompilePlan, choose_compile, compile_experts
from engine.speed.options import SpeedOptions


@dataclass(frozen=True)
class SpeedPlan:
    attention: AttentionPlan
    compile: CompilePlan
    cache: CachePlan

    @property
    def reasons(self) -> list[str]:
        return [f"attention: {self.attention.reason}", f"compile: {self.compile.reason}", f"step cache: {self.cache.note}"]

    def to_dict(self) -> dict:
        return {"attention": self.attention.to_dict(), "compile": self.compile.to_dict(), "cache": self.cache.to_dict(),
                "reasons": self.reasons}


def resolve_options(options: SpeedOptions | None, default_attention: str = "auto",
                    default_compile: str = "auto") -> SpeedOptions:
    """The request's choices, with `auto` attention/compile taken from the app's flags."""
    o = options or SpeedOptions()
    return SpeedOptions(
        attention=default_attention if o.attention == "auto" else o.attention,
        compile=default_compile if o.compile == "auto" else o.compile,
        cache=o.cache, cache_threshold=o.cache_threshold, fp8_compute=o.fp8_compute,
    )


def plan_speed(options: SpeedOptions, device: DeviceInfo, steps: int, offload_mode: str, *,
               usable: dict[str, str | None], toolchain: str | None = None, runtime_loras: bool = False,
               compile_backend: str = "inductor") -> SpeedPlan:
    """Pure: every input is a plain value, so tests build devices and installed-kernel sets directly."""
    return SpeedPlan(
        attention=choose_attention(options.attention, device, usable),
        compile=choose_compile(options.compile, device.type, offload_mode, runtime_loras=runtime_loras,
                               toolchain=toolchain, backend=compile_backend),
        cache=choose_cache(options.cache, options.threshold, steps),
    )


def plan_speed_here(options: SpeedOptions, device, steps: int, offload_mode: str, *, runtime_loras: bool = False,
                    compile_backend: str = "inductor") -> SpeedPlan:
    """plan_speed with this machine's device, installed kernels and compiler toolchain."""
    from engine.speed.attention import usable_backends
    from engine.speed.compile import toolchain_problem

    info = DeviceInfo.capture(device)
    return plan_speed(options, info, steps, offload_mode, usable=usable_backends(),
                      toolchain=toolchain_problem(info.type, compile_backend), runtime_loras=runtime_loras,
                      compile_backend=compile_backend)


def apply_speed(transformers: list, plan: SpeedPlan, device) -> dict:
    """Attention backend (with its test call and fallback), then regional compile once per model.

    The backend goes first: it is read while tracing, so setting it after compiling would recompile.
    Returns the applied state for the run report; `attention` differs from the plan only after a fallback.
    """
    attention = apply_attention(transformers, plan.attention.requested, device)
    changes = compile_experts(transformers, plan.compile)
    return {"attention": attention.to_dict(), "compile": {**plan.compile.to_dict(), "changes": changes},
            "cache": plan.cache.to_dict()}
