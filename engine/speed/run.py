"""The speed side of one generation, as the Generator sees it: plan, apply, cache the denoising loop, report.

Keeps engine/run/generate.py's hook points to one line each.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from engine.speed.cache import StepCounter, step_cache
from engine.speed.options import SpeedOptions
from engine.speed.plan import SpeedPlan, apply_speed, plan_speed_here, resolve_options


class RunSpeed:
    def __init__(self, options: SpeedOptions, steps: int, compile_backend: str = "inductor",
                 runtime_loras: bool = False):
        self.options = options
        self.steps = steps
        self.compile_backend = compile_backend
        self.runtime_loras = runtime_loras
        self.plan: SpeedPlan | None = None
        self.applied: dict[str, Any] = {}
        self.counter: StepCounter | None = None

    @classmethod
    def for_request(cls, req, steps: int, settings, memory_plan) -> "RunSpeed":
        options = resolve_options(getattr(req, "speed", None), getattr(settings, "attention", "auto"),
                                  getattr(settings, "compile", "auto"))
        runtime = any(e.enabled and getattr(e, "scheduled", False) for e in req.stack.entries)
        run = cls(options, steps, getattr(settings, "compile_backend", "inductor"), runtime)
        run.replan(memory_plan)
        return run

    def replan(self, memory_plan) -> SpeedPlan:
        """Plan for the memory plan in force (an out-of-memory retry may move to an offload compile avoids)."""
        self.plan = plan_speed_here(self.options, _device(memory_plan), self.steps, memory_plan.mode.value,
                                    runtime_loras=self.runtime_loras, compile_backend=self.compile_backend)
        return self.plan

    def apply(self, transformers: list, memory_plan, on_event: Callable[[str, Any], None],
              lora_report: list[dict] | None = None) -> None:
        """After the stack is applied: a row the LoRA engine ran as `runtime` (a schedule, or a layer it could
        not merge) means forward hooks inside the blocks, which compile must not run over."""
        if any(row.get("mode") == "runtime" for row in lora_report or []):
            self.runtime_loras = True
        self.replan(memory_plan)
        self.applied = apply_speed(transformers, self.plan, _device(memory_plan))
        self.applied["fp8_compute"] = _fp8(transformers, self.options.fp8_compute, _device(memory_plan))
        if self.applied["attention"]["backend"] != self.plan.attention.backend:
            on_event("status", f"attention: {self.applied['attention']['reason']}")
        if any("compiled with" in line for line in self.applied["compile"]["changes"]):
            on_event("status", "compiling the transformer blocks (first run of this model only)")

    @contextlib.contextmanager
    def caching(self, transformers: list):
        with step_cache(transformers, self.plan.cache) as counter:
            self.counter = counter
            yield counter

    def end_step(self) -> None:
        if self.counter is not None:
            self.counter.end_step()

    def report(self) -> dict[str, Any]:
        out = dict(self.applied) if self.applied else (self.plan.to_dict() if self.plan else {})
        if self.counter is not None:
            out["cache"] = {**out.get("cache", {}), **self.counter.to_dict()}
        return out


def _fp8(transformers: list, wanted: bool, device) -> dict[str, Any]:
    from engine.speed.attention import DeviceInfo
    from engine.speed.fp8 import disable_fp8_compute, enable_fp8_compute, fp8_compute_problem, fp8_layers

    if not wanted:
        disable_fp8_compute(transformers)
        return {"enabled": False, "reason": "off"}
    layers = fp8_layers(transformers)
    problem = fp8_compute_problem(DeviceInfo.capture(device)) or (None if layers else "the experts hold no fp8 layers")
    if problem:
        disable_fp8_compute(transformers)
        return {"enabled": False, "reason": problem}
    enable_fp8_compute(transformers)
    return {"enabled": True, "layers": layers, "reason": f"{layers} fp8 layers multiply in fp8 (torch._scaled_mm)"}


def _device(memory_plan):
    import torch

    return torch.device("cuda" if memory_plan.device == "cuda" else "cpu")
