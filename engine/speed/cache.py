"""Step caches from diffusers' hooks (First-Block cache): planned per run, attached for one run, counted.

First-Block cache runs the first transformer block every pass and compares its residual with the previous
pass of the same branch (cond / uncond); under the threshold the remaining blocks are skipped and their
cached residual reused. A pass is "skipped" here when that happened (the first block still ran).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from engine.speed.options import MIN_CACHE_STEPS

log = logging.getLogger(__name__)

_FBC_LEADER = "fbc_leader_block_hook"  # diffusers.hooks.first_block_cache._FBC_LEADER_BLOCK_HOOK


@dataclass(frozen=True)
class CachePlan:
    kind: str  # "off" or a cache name
    threshold: float | None
    requested: str
    note: str

    @property
    def enabled(self) -> bool:
        return self.kind != "off"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "requested": self.requested, "threshold": self.threshold, "note": self.note}


def choose_cache(requested: str, threshold: float | None, steps: int) -> CachePlan:
    if requested == "off":
        return CachePlan("off", None, requested, "off")
    if steps < MIN_CACHE_STEPS:
        return CachePlan("off", None, requested,
                         f"{requested} cache off: {steps} steps is under {MIN_CACHE_STEPS}, where every step counts and a cache does not help")
    return CachePlan(requested, threshold, requested,
                     f"{requested} cache, threshold {threshold:g}: a pass whose first-block change is under it reuses the other blocks")


@dataclass
class StepCounter:
    """Transformer passes computed in full vs served from the cache, and the same per denoising step."""

    passes_computed: int = 0
    passes_skipped: int = 0
    steps_computed: int = 0
    steps_skipped: int = 0
    _step_computed: bool = False
    _step_passes: int = 0
    history: list[bool] = field(default_factory=list)  # per step: True when any pass of it ran in full

    def record(self, computed: bool) -> None:
        if computed:
            self.passes_computed += 1
            self._step_computed = True
        else:
            self.passes_skipped += 1
        self._step_passes += 1

    def end_step(self) -> None:
        if not self._step_passes:
            return
        self.history.append(self._step_computed)
        if self._step_computed:
            self.steps_computed += 1
        else:
            self.steps_skipped += 1
        self._step_computed, self._step_passes = False, 0

    def to_dict(self) -> dict:
        return {"passes_computed": self.passes_computed, "passes_skipped": self.passes_skipped,
                "steps_computed": self.steps_computed, "steps_skipped": self.steps_skipped}


@contextlib.contextmanager
def step_cache(transformers, plan: CachePlan):
    """Attach the plan's cache to every expert for one run and count its decisions; always detached after.

    Yields a StepCounter (None when the plan is off). Call `end_step()` on it after each denoising step.
    """
    if not plan.enabled:
        yield None
        return
    from diffusers import FirstBlockCacheConfig
    from diffusers.hooks import HookRegistry

    counter = StepCounter()
    attached = []
    try:
        for module in transformers:
            module.enable_cache(FirstBlockCacheConfig(threshold=plan.threshold))
            attached.append(module)
            leader = HookRegistry.check_if_exists_or_initialize(module.blocks[0]).get_hook(_FBC_LEADER)
            leader._should_compute_remaining_blocks = _counting(leader._should_compute_remaining_blocks, counter)
        yield counter
    finally:
        for module in attached:
            module.disable_cache()
        counter.end_step()


def _counting(decide, counter: StepCounter):
    import torch

    # Runs outside any compiled graph (diffusers' decision is compiler.disable'd too, it reads a tensor).
    @torch.compiler.disable
    def counted(residual):
        computed = decide(residual)
        counter.record(bool(computed))
        return computed

    return counted
