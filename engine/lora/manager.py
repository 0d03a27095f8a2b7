"""LoraManager: a LoRA library plus one merge session, for callers that own the modules they patch
(the CLI, tests, benchmarks). The generator uses the parts directly: engine/lora/library.py (files,
cache, inspection), planning.py (the cap check, stack plans) and session.py (merge state owned by
the loaded pipeline)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.models.catalog import ModelSpec
from engine.lora.library import LoraLibrary, Resolver, slot_for
from engine.lora.planning import check_stack, plan_stack
from engine.lora.session import MergeSession
from engine.types import Stack


class LoraManager(LoraLibrary):
    """The library, and a merge session for whichever experts were last applied to (a new set of
    experts closes the previous session: its state never outlives the modules it patched)."""

    def __init__(self, loras_dir: str | Path, **kwargs):
        super().__init__(loras_dir, **kwargs)
        self.session: MergeSession | None = None
        self._w0_sources: dict[int, tuple[Any, Any]] = {}  # id(module) -> (weakref to module, WeightSource)

    @property
    def last_stats(self) -> dict[str, Any]:
        return self.session.last_stats if self.session is not None else {}

    def check(self, spec: ModelSpec, stack: Stack) -> list[str]:
        return check_stack(spec, stack)

    def plan(self, spec: ModelSpec, stack: Stack, shapes: dict[str, dict[str, tuple[int, ...]]], *,
             skip_failing: bool = False, resolve: Resolver | None = None):
        """What baking `stack` into a model would merge: (expert -> parameter -> contributions, rows)."""
        plan = plan_stack(self, spec, stack, shapes, skip_failing=skip_failing, resolve=resolve, allow_schedules=False)
        return plan.desired, plan.rows

    def register_source(self, module, source) -> None:
        """Where `module`'s W0 can be re-read from (a merge.WeightSource), for the next session on it."""
        import weakref

        from engine.lora.merge import WeightSource

        src = source if isinstance(source, WeightSource) else WeightSource(source)
        self._w0_sources[id(module)] = (weakref.ref(module), src)

    def apply(self, experts: dict[str, Any], spec: ModelSpec, stack: Stack, *, skip_failing: bool = False,
              resolve: Resolver | None = None, steps: int | None = None,
              high_steps: int | None = None) -> list[dict[str, Any]]:
        if self.session is None or not self.session.owns(experts):
            if self.session is not None:
                self.session.close()
            sources = {}
            for name, module in experts.items():
                ref, src = self._w0_sources.get(id(module), (None, None))
                if ref is not None and ref() is module:
                    sources[name] = src
            self.session = MergeSession(self, experts, w0_sources=sources)
        return self.session.apply(spec, stack, skip_failing=skip_failing, resolve=resolve, steps=steps,
                                  high_steps=high_steps)

    def set_step(self, step_index: int, total_steps: int) -> None:
        if self.session is not None:
            self.session.set_step(step_index, total_steps)

    def restore(self) -> None:
        """W0 back into the experts last applied to, bit for bit."""
        if self.session is not None:
            self.session.restore()

    def remove(self, experts: dict[str, Any] | None = None) -> None:
        """restore(), as the scheduled-weight and reliability tests call it."""
        self.restore()


__all__ = ["LoraManager", "slot_for"]
