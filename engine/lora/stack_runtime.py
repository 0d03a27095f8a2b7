"""The scheduled part of an applied stack: one RuntimeLoras per expert, rebuilt when the stack changes.

Entries with a constant weight are merged (zero per-step cost); entries whose weight is a schedule
come here and act through forward hooks whose strength `set_step()` updates before every step.
"""
from __future__ import annotations

import time
from typing import Any

from engine.lora.merge import Contribution
from engine.lora.runtime import RuntimeLoras


def split_scheduled(desired: dict[str, dict[str, list[Contribution]]]
                    ) -> tuple[dict[str, dict[str, list[Contribution]]], dict[str, dict[tuple, list[Contribution]]]]:
    """(what to merge, expert -> entry key -> its scheduled contributions)."""
    merged: dict[str, dict[str, list[Contribution]]] = {}
    runtime: dict[str, dict[tuple, list[Contribution]]] = {}
    for expert, params in desired.items():
        merged[expert] = {}
        for name, contribs in params.items():
            keep = [c for c in contribs if c.schedule is None]
            if keep:
                merged[expert][name] = keep
            for c in contribs:
                if c.schedule is not None:
                    runtime.setdefault(expert, {}).setdefault(c.key, []).append(c)
    return merged, runtime


def entry_id(key: tuple) -> str:
    """A readable runtime entry id from a contribution key (sha256, slot, weight, stack index)."""
    sha, slot, _w, index = key
    return f"{index}:{str(sha)[:12]}:{slot}"


class StackRuntime:
    """Owns the RuntimeLoras of the experts of one loaded pipeline; detached before any re-merge."""

    def __init__(self):
        self._by_expert: dict[str, RuntimeLoras] = {}
        self.key: Any = None
        self.set_step_seconds = 0.0

    def __bool__(self) -> bool:
        return bool(self._by_expert)

    def detach(self) -> None:
        for rt in self._by_expert.values():
            rt.detach()
        self._by_expert = {}
        self.key = None

    def build(self, experts: dict[str, Any], plan: dict[str, dict[tuple, list[Contribution]]], key: Any) -> None:
        """Attach one RuntimeLoras per expert that has scheduled entries (after the merge is done)."""
        self.detach()
        for expert, entries in plan.items():
            rt = RuntimeLoras(experts[expert], name=expert)
            for ckey, contribs in entries.items():
                rt.add(entry_id(ckey), [c.patch for c in contribs], contribs[0].schedule)
            rt.attach()
            self._by_expert[expert] = rt
        self.key = key

    def set_step(self, step_index: int, total_steps: int) -> None:
        t0 = time.perf_counter()
        for rt in self._by_expert.values():
            rt.set_step(step_index, total_steps)
        self.set_step_seconds = time.perf_counter() - t0

    def entry_report(self, experts: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Stack index -> expert -> {modules, rewritten, extra FLOPs per token, share of the expert's linear FLOPs}."""
        from engine.lora.runtime import is_linear_like

        out: dict[int, dict[str, Any]] = {}
        for expert, rt in self._by_expert.items():
            base = sum(2 * int(m.in_features) * int(m.out_features)
                       for m in experts[expert].modules() if is_linear_like(m))
            for eid, rep in rt.report().items():
                index = int(eid.split(":", 1)[0])
                out.setdefault(index, {})[expert] = {
                    "modules": rep["modules"], "rewritten": rep["rewritten"],
                    "extra_flops_per_token": rep["flops_per_token"],
                    "extra_linear_flops_fraction": round(rep["flops_per_token"] / base, 5) if base else None}
        return out

    def report(self, experts: dict[str, Any]) -> dict[str, Any]:
        """Per expert: entries, hooked modules, extra FLOPs per token and their share of the expert's linear FLOPs."""
        from engine.lora.runtime import is_linear_like

        out: dict[str, Any] = {}
        for expert, rt in self._by_expert.items():
            rep = rt.report()
            base = sum(2 * int(m.in_features) * int(m.out_features)
                       for m in experts[expert].modules() if is_linear_like(m))
            extra = sum(r["flops_per_token"] for r in rep.values())
            out[expert] = {"entries": len(rep), "modules": sum(r["modules"] for r in rep.values()),
                           "rewritten": sum(r["rewritten"] for r in rep.values()),
                           "extra_flops_per_token": extra,
                           "extra_linear_flops_fraction": round(extra / base, 5) if base else None}
        return out


def high_noise_steps_of(pipe, boundary_ratio: float | None, steps: int) -> int | None:
    """How many of `steps` the high-noise expert of a two-expert pipeline runs (None for one expert).

    Asks a copy of the pipeline's scheduler for its timesteps, as the Wan2.2 pipelines do before
    denoising, and counts those at or above the boundary.
    """
    if not boundary_ratio:
        return None
    from engine.lora.schedule import high_noise_steps

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device="cpu")
    return high_noise_steps(scheduler.timesteps, boundary_ratio * pipe.scheduler.config.num_train_timesteps)
