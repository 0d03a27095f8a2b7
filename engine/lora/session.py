"""A merge session: the LoRA state of one loaded pipeline's experts, released with that pipeline.

The session holds the experts through weak references, their per-parameter merge state (which patches
each parameter carries, where its W0 lives) and the runtime hooks of scheduled entries. The generator
creates one when it first applies a stack to a pipeline and closes it when the pipeline goes, so nothing
of an unloaded model is kept alive.
"""
from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from engine.models.catalog import ModelSpec
from engine.lora.library import LoraLibrary, Resolver
from engine.lora.planning import check_stack, plan_stack, stack_hashes, stack_scheduled
from engine.types import RequestError, Stack, WanStackError

log = logging.getLogger(__name__)


class MergeSession:
    """Applies stacks to one set of expert modules (expert name -> transformer), incrementally and exactly.

    `w0_sources` (expert -> merge.WeightSource) says where an expert's W0 can be re-read from when the
    module came from a single file (engine/models), so W0 is not copied.
    """

    def __init__(self, library: LoraLibrary, experts: dict[str, Any], w0_sources: dict[str, Any] | None = None):
        from engine.lora.stack_runtime import StackRuntime

        self.library = library
        self._experts = {name: weakref.ref(module) for name, module in experts.items()}
        self._w0_sources = dict(w0_sources or {})
        self._mergers: dict[str, Any] = {}  # expert -> merge.ModuleMerger
        self._runtime = StackRuntime()  # scheduled entries of the applied stack (forward hooks)
        self._last: tuple | None = None  # (fingerprint, skip_failing, report rows)
        self.last_stats: dict[str, Any] = {}
        self.closed = False

    def __enter__(self) -> "MergeSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def owns(self, experts: dict[str, Any]) -> bool:
        """Whether `experts` are exactly the modules this session was made for (and they are alive)."""
        return (not self.closed and set(experts) == set(self._experts)
                and all(self._experts[n]() is m for n, m in experts.items()))

    def _live(self) -> dict[str, Any]:
        if self.closed:
            raise WanStackError("this LoRA merge session was closed with its pipeline; load the model again")
        live = {name: ref() for name, ref in self._experts.items()}
        gone = [n for n, m in live.items() if m is None]
        if gone:
            raise WanStackError(f"the {', '.join(gone)} expert of this session was unloaded; load the model again")
        return live

    def _merger(self, name: str, module):
        from engine.lora.merge import ModuleMerger

        mg = self._mergers.get(name)
        if mg is None:
            mg = ModuleMerger(module)
            if name in self._w0_sources:
                mg.sources.insert(0, self._w0_sources[name])
            self._mergers[name] = mg
        return mg

    def apply(self, spec: ModelSpec, stack: Stack, *, skip_failing: bool = False, resolve: Resolver | None = None,
              steps: int | None = None, high_steps: int | None = None) -> list[dict[str, Any]]:
        """Merge `stack` into the experts' weights (exactly, in place) and report per entry.

        An unchanged stack does nothing; a changed one re-merges only the parameters whose contributions
        changed. The result depends only on W0 and the stack, never on earlier stacks. Entries with a
        weight schedule are not merged: they act through runtime hooks whose strength `set_step()` sets
        before each step; `high_steps` (how many of the run's `steps` the high-noise expert takes)
        places the schedules of phase-specific entries.
        """
        from engine.lora.stack_runtime import split_scheduled

        t0 = time.perf_counter()
        experts = self._live()
        bad = [e for e in experts if e not in spec.experts]
        if bad:
            raise RequestError(f"experts {bad} are not experts of {spec.type} ({', '.join(spec.experts)})")
        check_stack(spec, stack)
        hashes = stack_hashes(self.library, stack, skip_failing=skip_failing, resolve=resolve)
        fingerprint = (stack.fingerprint(hashes), high_steps if stack_scheduled(stack) else None)
        if self._last is not None and self._last[:2] == (fingerprint, skip_failing):
            self._runtime.set_step(0, steps or 1)
            self.last_stats = {"unchanged": True, "seconds": time.perf_counter() - t0,
                               "runtime": self._runtime.report(experts)}
            return [dict(r) for r in self._last[2]]
        self._runtime.detach()  # hooks off and rewritten parameters back before anything is re-merged
        mergers = {name: self._merger(name, module) for name, module in experts.items()}
        shapes = {name: mg.shapes() for name, mg in mergers.items()}
        plan = plan_stack(self.library, spec, stack, shapes, skip_failing=skip_failing, resolve=resolve,
                          high_steps=high_steps)
        desired, scheduled = split_scheduled(plan.desired)
        desired, scheduled = runtime_where_unmergeable(mergers, desired, scheduled, plan.rows)
        stats = {}
        for name, mg in mergers.items():
            s = mg.set(desired[name])
            stats[name] = {"written": s.written, "restored": s.restored, "unchanged": s.unchanged,
                           "file_backed": s.file_backed, "copied_bytes": s.copied_bytes,
                           "originals_bytes": mg.originals_bytes(), "seconds": round(s.seconds, 4)}
        self._runtime.build(experts, scheduled, fingerprint)
        self._runtime.set_step(0, steps or 1)
        for index, per_expert in self._runtime.entry_report(experts).items():  # issue 11: runtime cost per row
            row = plan.rows[index]
            row["runtime"] = per_expert
            share = max((v["extra_linear_flops_fraction"] or 0.0) for v in per_expert.values())
            row["mode_note"] = (f"weight schedule: runs unmerged through forward hooks, about {share * 100:.1f}% more "
                                "linear-layer FLOPs per step on the expert it acts on (a constant weight is merged: 0%)")
        self.last_stats = {"unchanged": False, "experts": stats, "seconds": time.perf_counter() - t0,
                           "runtime": self._runtime.report(experts)}
        self._last = (fingerprint, skip_failing, [dict(r) for r in plan.rows])
        self.library.pin({r["sha256"] for r in plan.rows if r["status"] == "applied" and r["sha256"]})
        self.library.evict()
        log.info("LoRA stack applied in %.3fs: %s", self.last_stats["seconds"], stats)
        return plan.rows

    def set_step(self, step_index: int, total_steps: int) -> None:
        """Set the scheduled entries' strengths for the next step (called before each denoising step)."""
        self._runtime.set_step(step_index, total_steps)

    def restore(self) -> None:
        """Give every expert back its W0, bit for bit (the session stays usable)."""
        self._runtime.detach()
        if self.closed:
            return
        for name, mg in self._mergers.items():
            if self._experts[name]() is not None:
                mg.restore_all()
        self._last = None
        self.library.pin(set())

    def close(self) -> None:
        """Drop the hooks and the merge state (and with it every reference to the experts' parameters).

        Merged weights are left as they are: a session is closed when its pipeline is discarded.
        """
        self._runtime.detach()
        self._mergers.clear()
        self._w0_sources.clear()
        self._last = None
        self.closed = True
        self.library.pin(set())


def runtime_where_unmergeable(mergers: dict[str, Any], desired, scheduled, rows):
    """Experts with block-quantized (GGUF) weights take the whole stack through the runtime path (issue 10):
    their constant entries become runtime entries of constant strength, reported as mode "runtime"."""
    from engine.lora.merge import Contribution

    for expert, mg in mergers.items():
        params = desired.get(expert, {})
        if not params or all(mg.mergeable(n) for n in params):
            continue
        for contribs in params.values():
            for c in contribs:
                scheduled.setdefault(expert, {}).setdefault(c.key, []).append(Contribution(c.key, c.patch, 1.0, c.weight))
                row = rows[c.key[3]]
                row.setdefault("mode_by_expert", {})[expert] = "runtime"
                row["mode"] = "runtime"
        desired[expert] = {}
    return desired, scheduled
