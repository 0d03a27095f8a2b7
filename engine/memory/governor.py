"""One call for the generator: apply the plan, watch memory, and retry heavier plans after an out-of-memory."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from engine.memory.offload import apply_plan
from engine.memory.policy import OffloadPlan
from engine.memory.recovery import run_with_oom_recovery
from engine.memory.snapshot import MemorySnapshot
from engine.memory.watch import MemoryWatch, Sampler

T = TypeVar("T")


def governed_run(pipe, plan: OffloadPlan, device, run: Callable[[], T],
                 on_event: Callable[[str, Any], None] | None = None, snapshot: MemorySnapshot | None = None,
                 context: str = "", interval_s: float = 0.5) -> tuple[T, OffloadPlan, MemoryWatch]:
    """`run()` under `plan` on `device`; returns (result, the plan that finished, the watch with its peaks).

    Events (engine.facade's vocabulary): "plan" (dict) before each attempt, "memory" (dict) about
    twice a second, "retry" (str) after an out-of-memory. Weights edited in place by a LoRA merge
    survive apply_plan in every mode, so the stack may be applied before or after this call.
    """
    emit = on_event or (lambda kind, payload: None)
    finished = {"plan": plan}

    def attempt(p: OffloadPlan) -> T:
        apply_plan(pipe, p, device)
        finished["plan"] = p
        emit("plan", p.to_dict())
        return run()

    gpu = snapshot.gpu(getattr(device, "index", None) or 0) if snapshot is not None and snapshot.available else None
    sampler = Sampler(nvml_index=gpu.index if gpu is not None else 0)
    with MemoryWatch(lambda s: emit("memory", s.to_dict()), interval_s=interval_s, sampler=sampler) as watch:
        result = run_with_oom_recovery(attempt, plan, lambda msg: emit("retry", msg), context=context)
    return result, finished["plan"], watch
