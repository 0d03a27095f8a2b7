"""A merge session: the merged-LoRA state of one loaded pipeline's experts, released with that pipeline.

The session holds the experts through weak references and their per-parameter merge state (which
patches each parameter carries, where its W0 lives). The generator creates one when it loads a
pipeline and closes it when the pipeline goes, so nothing of an unloaded model is kept alive.
"""
from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from engine.catalog import ModelSpec
from engine.lora.library import LoraLibrary, Resolver
from engine.lora.planning import check_stack, plan_stack, stack_hashes
from engine.types import RequestError, Stack, WanStackError

log = logging.getLogger(__name__)


class MergeSession:
    """Applies stacks to one set of expert modules (expert name -> transformer), incrementally and exactly."""

    def __init__(self, library: LoraLibrary, experts: dict[str, Any]):
        self.library = library
        self._experts = {name: weakref.ref(module) for name, module in experts.items()}
        self._mergers: dict[str, Any] = {}  # expert -> merge.ModuleMerger
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

    def apply(self, spec: ModelSpec, stack: Stack, *, skip_failing: bool = False,
              resolve: Resolver | None = None) -> list[dict[str, Any]]:
        """Merge `stack` into the experts' weights (exactly, in place) and report per entry.

        An unchanged stack does nothing; a changed one re-merges only the parameters whose contributions
        changed. The result depends only on W0 and the stack, never on earlier stacks.
        """
        from engine.lora.merge import ModuleMerger

        t0 = time.perf_counter()
        experts = self._live()
        bad = [e for e in experts if e not in spec.experts]
        if bad:
            raise RequestError(f"experts {bad} are not experts of {spec.type} ({', '.join(spec.experts)})")
        for name, module in experts.items():
            if name not in self._mergers:
                self._mergers[name] = ModuleMerger(module)
        check_stack(spec, stack)
        fingerprint = stack.fingerprint(stack_hashes(self.library, stack, skip_failing=skip_failing, resolve=resolve))
        if self._last is not None and self._last[:2] == (fingerprint, skip_failing):
            self.last_stats = {"unchanged": True, "seconds": time.perf_counter() - t0}
            return [dict(r) for r in self._last[2]]
        shapes = {name: mg.shapes() for name, mg in self._mergers.items()}
        plan = plan_stack(self.library, spec, stack, shapes, skip_failing=skip_failing, resolve=resolve)
        stats = {}
        for name, mg in self._mergers.items():
            s = mg.set(plan.desired[name])
            stats[name] = {"written": s.written, "restored": s.restored, "unchanged": s.unchanged,
                           "file_backed": s.file_backed, "copied_bytes": s.copied_bytes,
                           "originals_bytes": mg.originals_bytes(), "seconds": round(s.seconds, 4)}
        self.last_stats = {"unchanged": False, "experts": stats, "seconds": time.perf_counter() - t0}
        self._last = (fingerprint, skip_failing, [dict(r) for r in plan.rows])
        self.library.pin({r["sha256"] for r in plan.rows if r["status"] == "applied" and r["sha256"]})
        self.library.evict()
        log.info("LoRA stack applied in %.3fs: %s", self.last_stats["seconds"], stats)
        return plan.rows

    def restore(self) -> None:
        """Give every expert back its W0, bit for bit (the session stays usable)."""
        if self.closed:
            return
        for name, mg in self._mergers.items():
            if self._experts[name]() is not None:
                mg.restore_all()
        self._last = None
        self.library.pin(set())

    def close(self) -> None:
        """Drop the merge state (and with it every reference to the experts' parameters).

        The weights are left as they are: a session is closed when its pipeline is discarded.
        """
        self._mergers.clear()
        self._last = None
        self.closed = True
        self.library.pin(set())
