"""LoraManager: the engine's one entry point for LoRA files, stacks and their merged application."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from engine.catalog import EXPERT_COMPONENT, ModelSpec
from engine.lora.errors import LoraCapExceeded, LoraFormatError, LoraIncompatibleError
from engine.lora.files import PICKLE_SUFFIXES, check_regular, file_sha256, read_lora_file, read_lora_shapes
from engine.lora.formats import LOW, MAIN, ParsedLora, parse_lora
from engine.lora.inspection import (
    Coverage, check_family, coverage, describe, expert_hint, file_coverage, lora_width, width_of_shapes,
)
from engine.lora.merge import Contribution, ModuleMerger, WeightSource, model_param_shapes, transformer_config
from engine.lora.schedule import constant_value, format_weight, is_constant, strength_for_expert
from engine.lora.stack_runtime import StackRuntime, split_scheduled
from engine.types import LoraEntry, RequestError, Stack

log = logging.getLogger(__name__)

Resolver = Callable[[str], Path]
LIST_HASH_MAX_BYTES = 4 << 30  # the listing never reads more of one file; larger ones are hashed when used


def slot_for(parsed: ParsedLora, expert: str) -> str:
    """Which part of a file acts on an expert: the `_2` part of a two-expert file goes to low_noise."""
    return LOW if parsed.two_expert and expert == "low_noise" else MAIN


class LoraManager:
    """Reads, inspects and applies LoRA stacks; keeps parsed files (by sha256) and the merge state."""

    def __init__(self, loras_dir: str | Path, *, allow_pickle: bool = False, cache_entries: int = 8,
                 cache_bytes: int = 4 << 30, extra_dirs: dict[str, Path] | None = None):
        self.loras_dir = Path(loras_dir)
        # More LoRA folders, listed and named as "<prefix>/<file>" (e.g. "comfyui/x.safetensors" for --comfyui)
        self._extra = {prefix: LoraManager(folder, allow_pickle=allow_pickle)
                       for prefix, folder in (extra_dirs or {}).items()}
        self.allow_pickle = allow_pickle
        self.cache_entries = cache_entries
        self.cache_bytes = cache_bytes  # parsed files beyond the applied stack are dropped past this
        self._pinned: set[str] = set()  # sha256 of the applied stack: kept so a slider change never re-reads
        self._parsed: OrderedDict[str, ParsedLora] = OrderedDict()  # sha256 -> parsed, LRU
        self._sha_by_stat: dict[tuple[str, int, int], str] = {}
        self._describe: dict[str, dict[str, Any]] = {}  # sha256 -> describe() of the header-only parse
        self._mergers: dict[int, ModuleMerger] = {}
        self._last: tuple | None = None  # (expert module ids, fingerprint, skip_failing, results)
        self._runtime = StackRuntime()  # scheduled entries of the applied stack (forward hooks)
        self.last_stats: dict[str, Any] = {}

    # -- files -----------------------------------------------------------------------------------

    def path_of(self, file: str, resolve: Resolver | None = None) -> Path:
        """The file of a stack entry; entries must stay inside the LoRA folder unless `resolve` is given (CLI)."""
        if resolve is not None:
            return Path(resolve(file))
        prefix, _, rest = str(file).partition("/")
        if rest and prefix in self._extra:
            return self._extra[prefix].path_of(rest)
        p = Path(file)
        if p.is_absolute():
            raise RequestError(f"LoRA file {file} must be relative to the LoRA folder {self.loras_dir}")
        root = self.loras_dir.resolve()
        full = (root / p).resolve()
        if not full.is_relative_to(root):
            raise RequestError(f"LoRA file {file} points outside the LoRA folder {self.loras_dir}; use a path inside it")
        return full

    def sha256_of(self, path: Path, max_bytes: int | None = None) -> str | None:
        """sha256 of a file, cached by (path, size, mtime) so an unchanged file is hashed once.

        With `max_bytes` (listing), a larger file is not read and gives None; it is hashed when used.
        """
        st = check_regular(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
        sha = self._sha_by_stat.get(key)
        if sha is None:
            sha = file_sha256(path, max_bytes)
            if sha is not None:
                self._sha_by_stat[key] = sha
        return sha

    def load(self, path: str | Path) -> ParsedLora:
        """Parsed LoRA (all tensors in RAM), cached by sha256; a cached file is never re-read."""
        path = Path(path)
        if not path.is_file():
            raise LoraFormatError(f"LoRA file {path} not found; check the path or rescan the LoRA folder")
        if path.suffix.lower() in PICKLE_SUFFIXES and not self.allow_pickle:
            read_lora_file(path, allow_pickle=False)  # raises the pickle message
        sha = self.sha256_of(path)
        hit = self._parsed.get(sha)
        if hit is not None:
            self._parsed.move_to_end(sha)
            return hit
        parsed = parse_lora(read_lora_file(path, allow_pickle=self.allow_pickle, sha256=sha))
        self._parsed[sha] = parsed
        self._evict()
        return parsed

    def _evict(self) -> None:
        """Drop least recently used parsed files (never the applied stack's) past the entry/byte budget."""
        def over() -> bool:
            total = sum(p.nbytes() for p in self._parsed.values())
            return len(self._parsed) > self.cache_entries or total > self.cache_bytes

        for sha in list(self._parsed):
            if not over():
                break
            if sha not in self._pinned:
                del self._parsed[sha]

    # -- inspection ------------------------------------------------------------------------------

    def inspect(self, path: str | Path, model_dir: str | Path | None = None) -> dict[str, Any]:
        """Format, rank, alpha, family, experts; with `model_dir` also coverage per expert and compatibility."""
        p = Path(path)
        if not p.is_absolute() and not p.exists():
            p = self.path_of(str(path))
        parsed = self.load(p)
        info = describe(parsed, p.name)
        if model_dir is None:
            return info
        from engine.catalog import get_spec
        from engine.detect import detect

        mi = detect(model_dir)
        if not mi.ok or not mi.type:
            raise RequestError(f"--model {model_dir}: {mi.reason}")
        spec = get_spec(mi.type)
        shapes = {e: model_param_shapes(Path(model_dir) / EXPERT_COMPONENT[e]) for e in spec.experts}
        info["model"] = {"path": str(model_dir), "type": spec.type, "label": spec.label, "experts": list(spec.experts),
                         "width": width_of_shapes(next(iter(shapes.values())))}
        info.update(self._compat(parsed, spec, shapes, p.name))
        return info

    def _compat(self, parsed: ParsedLora, spec: ModelSpec, shapes: dict[str, dict], name: str) -> dict[str, Any]:
        width = width_of_shapes(next(iter(shapes.values()))) or spec.memory.width
        out: dict[str, Any] = {"compatible": True, "reason": ""}
        try:
            check_family(parsed, width, spec.label, name)
        except LoraIncompatibleError as e:
            out.update(compatible=False, reason=str(e))
        per: dict[str, Coverage] = {}
        for expert, sh in shapes.items():
            per[expert] = coverage(parsed, slot_for(parsed, expert), sh)
        used = {slot_for(parsed, e) for e in shapes}
        out["coverage_by_expert"] = {e: c.to_dict() for e, c in per.items()}
        out["coverage"] = file_coverage(parsed, per, used, None if spec.dual_expert else
                                        "low-noise part of a two-expert file; this model has one expert")
        if out["compatible"] and out["coverage"]["applied"] == 0:
            out.update(compatible=False, reason=f"{name}: none of its {len(parsed.keys)} keys match a {spec.label} layer")
        return out

    def list_loras(self, spec: ModelSpec | None = None) -> list[dict[str, Any]]:
        """Every *.safetensors under the LoRA folder (relative paths), inspected from headers only."""
        rows: list[dict[str, Any]] = []
        for prefix, sub in self._extra.items():
            rows += [{**row, "file": f"{prefix}/{row['file']}"} for row in sub.list_loras(spec)]
        if not self.loras_dir.is_dir():
            return rows
        root = self.loras_dir.resolve()
        for path in sorted(self.loras_dir.rglob("*.safetensors")):
            rel = path.relative_to(self.loras_dir).as_posix()
            row: dict[str, Any] = {"file": rel}
            try:
                check_regular(path)
                if not path.resolve().is_relative_to(root):
                    raise LoraFormatError(f"{rel} is a link to a file outside the LoRA folder; copy the file in instead")
                sha = self.sha256_of(path, max_bytes=LIST_HASH_MAX_BYTES)
                st = path.stat()
                cache_key = sha or f"unhashed:{path}:{st.st_size}:{st.st_mtime_ns}"
                info = self._describe.get(cache_key)
                if info is None:
                    parsed = parse_lora(read_lora_shapes(path, sha256=sha or ""))
                    info = describe(parsed, path.name)
                    info["_width"] = lora_width(parsed)
                    self._describe[cache_key] = info
                row.update({k: v for k, v in info.items() if not k.startswith("_")}, file=rel, ok=True,
                           sha256=sha)
                row["compatible"], row["reason"] = self._list_compat(info, spec)
            except (LoraFormatError, LoraIncompatibleError, OSError) as e:
                row.update(ok=False, compatible=False, reason=str(e))
            except Exception as e:  # noqa: BLE001 - one odd file must never break the listing of the others
                log.exception("reading %s for the LoRA list failed", rel)
                row.update(ok=False, compatible=False, reason=f"{rel} could not be read ({type(e).__name__}: {e})")
            rows.append(row)
        return rows

    @staticmethod
    def _list_compat(info: dict[str, Any], spec: ModelSpec | None) -> tuple[bool, str]:
        if spec is None:
            return True, ""
        width = info.get("_width")
        if width is not None and width != spec.memory.width:
            return False, (f"made for {info['family']} (width {width}); this model is {spec.label} "
                           f"(width {spec.memory.width})")
        notes = []
        if info.get("image_keys") and spec.task == "t2v":
            notes.append("its image cross-attention keys are skipped on this text-to-video model")
        if info.get("two_expert") and not spec.dual_expert:
            notes.append("two-expert file: only its high-noise part acts on this single-expert model")
        return True, "; ".join(notes)

    # -- stacks ----------------------------------------------------------------------------------

    def check(self, spec: ModelSpec, stack: Stack) -> list[str]:
        """Cap and routing checks before any model load. Raises LoraCapExceeded; returns warnings."""
        for expert in spec.experts:
            n = len(stack.enabled_for(expert))
            if n > spec.lora_cap:
                where = "" if expert == "single" else f" on the {expert} expert"
                raise LoraCapExceeded(
                    f"{n} enabled LoRAs act{where} of {spec.type}, but the cap for {spec.type} is {spec.lora_cap} "
                    f"per expert; disable {n - spec.lora_cap} of them or raise it with --lora-cap {spec.type}=N"
                )
        warnings: list[str] = []
        if not spec.dual_expert:
            for e in stack.entries:
                if e.enabled and e.applies_to in ("high_noise", "low_noise"):
                    warnings.append(
                        f"{e.file} is set to {e.applies_to}, but {spec.label} has one expert; it acts on that expert"
                    )
                if e.enabled and e.low_noise_weight is not None:
                    warnings.append(f"{e.file}: low_noise_weight is ignored on {spec.label} (one expert); weight {format_weight(e.weight)} is used")
        return warnings

    def apply(self, experts: dict[str, Any], spec: ModelSpec, stack: Stack, *, skip_failing: bool = False,
              resolve: Resolver | None = None, steps: int | None = None,
              high_steps: int | None = None) -> list[dict[str, Any]]:
        """Merge `stack` into the experts' weights (exactly, in place) and report per entry.

        `experts` maps 'high_noise'/'low_noise' (or 'single') to the transformer module. An unchanged
        stack does nothing; a changed one re-merges only the parameters whose contributions changed.
        Entries with a weight schedule are not merged: they act through runtime hooks whose strength
        `set_step()` sets before each step; `high_steps` (how many of the run's `steps` the high-noise
        expert takes) places the schedules of phase-specific entries.
        """
        t0 = time.perf_counter()
        bad = [e for e in experts if e not in spec.experts]
        if bad:
            raise RequestError(f"experts {bad} are not experts of {spec.type} ({', '.join(spec.experts)})")
        global_warnings = self.check(spec, stack)
        paths, hashes, results = self._resolve_files(stack, skip_failing, resolve)
        module_ids = tuple((name, id(m)) for name, m in sorted(experts.items()))
        fingerprint = (stack.fingerprint(hashes), high_steps if stack_scheduled(stack) else None)
        if self._last is not None and self._last[:3] == (module_ids, fingerprint, skip_failing):
            self._runtime.set_step(0, steps or 1)
            self.last_stats = {"unchanged": True, "seconds": time.perf_counter() - t0,
                               "runtime": self._runtime.report(experts)}
            return [dict(r) for r in self._last[3]]
        self._runtime.detach()  # hooks off and rewritten parameters back before anything is re-merged

        self._pinned |= set(hashes.values())  # the files being applied stay cached while the others load
        mergers = {name: self._merger(m) for name, m in experts.items()}
        shapes = {name: mg.shapes() for name, mg in mergers.items()}
        desired = self._desired(spec, stack, shapes, paths, results, skip_failing, high_steps)
        desired, scheduled = split_scheduled(desired)
        desired, scheduled = _runtime_where_unmergeable(mergers, desired, scheduled, results)
        stats = {}
        for name, mg in mergers.items():
            s = mg.set(desired[name])
            stats[name] = {"written": s.written, "restored": s.restored, "unchanged": s.unchanged,
                           "file_backed": s.file_backed, "copied_bytes": s.copied_bytes,
                           "originals_bytes": mg.originals_bytes(), "seconds": round(s.seconds, 4)}
        self._runtime.build(experts, scheduled, fingerprint)
        self._runtime.set_step(0, steps or 1)
        for row in results:
            row["warnings"] = global_warnings_for(row["file"], global_warnings) + row["warnings"]
        self.last_stats = {"unchanged": False, "experts": stats, "seconds": time.perf_counter() - t0,
                           "runtime": self._runtime.report(experts)}
        self._last = (module_ids, fingerprint, skip_failing, [dict(r) for r in results])
        self._pinned = {r["sha256"] for r in results if r["status"] == "applied" and r["sha256"]}
        self._evict()
        log.info("LoRA stack applied in %.3fs: %s", self.last_stats["seconds"], stats)
        return results

    def plan(self, spec: ModelSpec, stack: Stack, shapes: dict[str, dict[str, tuple[int, ...]]], *,
             skip_failing: bool = False, resolve: Resolver | None = None
             ) -> tuple[dict[str, dict[str, list[Contribution]]], list[dict[str, Any]]]:
        """What `apply` would merge, without a module: (expert -> parameter -> contributions, per-entry rows).

        `shapes` maps each expert to its parameter shapes (e.g. merge.model_param_shapes of its folder).
        Used by the streamed `lora merge` (engine/lora/rewrite.py), which applies the same contributions
        tensor by tensor with merge.merged_tensor.
        """
        bad = [e for e in shapes if e not in spec.experts]
        if bad:
            raise RequestError(f"experts {bad} are not experts of {spec.type} ({', '.join(spec.experts)})")
        global_warnings = self.check(spec, stack)
        paths, _hashes, results = self._resolve_files(stack, skip_failing, resolve)
        scheduled = [e.file for e in stack.entries if e.enabled and e.scheduled]
        if scheduled:
            raise RequestError(
                f"{scheduled[0]} has a weight schedule; a baked model holds one fixed weight per LoRA, "
                "so give it a single number here (schedules apply at generation time)")
        desired = self._desired(spec, stack, shapes, paths, results, skip_failing)
        for row in results:
            row["warnings"] = global_warnings_for(row["file"], global_warnings) + row["warnings"]
        return desired, results

    def _resolve_files(self, stack: Stack, skip_failing: bool, resolve: Resolver | None):
        """Paths and sha256 of the enabled entries, and one report row per entry."""
        paths: dict[int, Path] = {}
        hashes: dict[str, str] = {}
        results: list[dict[str, Any]] = []
        for i, entry in enumerate(stack.entries):
            row = {"file": entry.file, "sha256": entry.sha256, "status": "disabled", "weights": {},
                   "coverage": {}, "coverage_by_expert": {}, "warnings": [], "reason": ""}
            results.append(row)
            if not entry.enabled:
                continue
            try:
                paths[i] = self.path_of(entry.file, resolve)
                if not paths[i].is_file():
                    raise LoraFormatError(f"LoRA file {entry.file} not found in {self.loras_dir if resolve is None else 'the given path'}")
                hashes[entry.file] = row["sha256"] = self.sha256_of(paths[i])
            except (LoraFormatError, RequestError, OSError) as e:
                if not skip_failing:
                    raise
                row.update(status="failed", reason=str(e))
                paths.pop(i, None)
        return paths, hashes, results

    def _desired(self, spec: ModelSpec, stack: Stack, shapes: dict[str, dict], paths: dict[int, Path],
                 results: list[dict[str, Any]], skip_failing: bool,
                 high_steps: int | None = None) -> dict[str, dict[str, list[Contribution]]]:
        """Contributions per expert and parameter, in stack order; fills coverage into `results`."""
        model_width = width_of_shapes(next(iter(shapes.values()))) if shapes else None
        desired: dict[str, dict[str, list[Contribution]]] = {name: {} for name in shapes}
        for i, entry in enumerate(stack.entries):
            row = results[i]
            if i not in paths:
                continue
            try:
                parsed = self.load(paths[i])
                check_family(parsed, model_width, spec.label, entry.file)
                plan = self._plan_entry(i, entry, parsed, spec, shapes, shapes, row, high_steps)
            except (LoraFormatError, LoraIncompatibleError) as e:
                if not skip_failing:
                    raise
                row.update(status="failed", reason=str(e), warnings=row["warnings"] + [f"skipped: {e}"])
                continue
            for expert, contribs in plan.items():
                for c in contribs:
                    desired[expert].setdefault(c.patch.target, []).append(c)
        return desired

    def _plan_entry(self, i: int, entry: LoraEntry, parsed: ParsedLora, spec: ModelSpec, experts: dict[str, Any],
                    shapes: dict[str, dict], row: dict[str, Any],
                    high_steps: int | None = None) -> dict[str, list[Contribution]]:
        """Coverage per expert and the contributions this entry adds; raises when nothing of it fits.

        A constant weight (a number or a list of equal values) is merged; a schedule gives
        contributions with a per-step strength function (runtime path)."""
        per: dict[str, Coverage] = {}
        plan: dict[str, list[Contribution]] = {}
        used_slots: set[str] = set()
        acting_applied = 0
        modes: dict[str, str] = {}
        for expert in experts:
            sched = entry.schedule_for(expert)
            w = constant_value(sched) if is_constant(sched) else list(sched)
            row["weights"][expert] = w
            slot = slot_for(parsed, expert)
            if entry.applies_to not in ("both", expert) and expert != "single":
                continue
            cov = coverage(parsed, slot, shapes[expert])
            per[expert] = cov
            used_slots.add(slot)
            if not is_constant(sched):
                whole_run = not spec.dual_expert or (entry.applies_to == "both" and entry.low_noise_weight is None)
                fn = strength_for_expert(sched, whole_run, expert, high_steps)
                acting_applied += len(cov.applied_keys)
                plan[expert] = [Contribution((parsed.sha256, slot, tuple(sched), i), p, 1.0, fn) for p in cov.patches]
                modes[expert] = "runtime"
            elif w != 0.0:
                acting_applied += len(cov.applied_keys)
                plan[expert] = [Contribution((parsed.sha256, slot, w, i), p, w) for p in cov.patches]
                modes[expert] = "merged"
        hint = expert_hint(entry.file)
        if spec.dual_expert and hint and not parsed.two_expert and entry.applies_to not in (hint,):
            row["warnings"].append(f"{entry.file}: the file name suggests {hint}, but the entry applies to {entry.applies_to}")
        if parsed.two_expert and not spec.dual_expert:
            row["warnings"].append(
                f"{entry.file} holds two experts; {spec.label} has one, so only its high-noise part is applied"
            )
        row["coverage_by_expert"] = {e: c.to_dict() for e, c in per.items()}
        row["coverage"] = file_coverage(
            parsed, per, used_slots,
            None if spec.dual_expert else "low-noise part of a two-expert file; this model has one expert",
        )
        if plan and acting_applied == 0:
            raise LoraIncompatibleError(
                f"{entry.file}: none of its {len(parsed.keys)} keys match a layer of {spec.label}; "
                "it is not a LoRA for this model"
            )
        row["status"] = "applied" if plan else "skipped"
        if plan:
            row["mode"] = "runtime" if "runtime" in modes.values() else "merged"
            row["mode_by_expert"] = modes
        if not plan:
            row["reason"] = "weight 0 on every expert it acts on" if per else "acts on no expert of this model"
        return plan

    def set_step(self, step_index: int, total_steps: int) -> None:
        """Set the scheduled entries' strengths for the next step (called before each denoising step)."""
        self._runtime.set_step(step_index, total_steps)

    def remove(self, experts: dict[str, Any]) -> None:
        """Restore W0 in every expert (bit for bit)."""
        self._runtime.detach()
        for module in experts.values():
            mg = self._mergers.get(id(module))
            if mg is not None and mg.module is module:
                mg.restore_all()
        self._last = None
        self._pinned = set()

    def forget(self, experts: dict[str, Any]) -> None:
        """Drop the merge state of modules being unloaded (after remove(), or when they are discarded)."""
        self._runtime.detach()
        for module in experts.values():
            self._mergers.pop(id(module), None)
        self._last = None

    def register_source(self, module, folder: "str | Path | WeightSource") -> None:
        """Tell the merger where `module`'s weights live on disk so W0 is re-read instead of copied
        (a folder, or a WeightSource over a single file with its own key names)."""
        mg = self._merger(module)
        mg.sources.insert(0, folder if isinstance(folder, WeightSource) else WeightSource(folder))

    def _merger(self, module) -> ModuleMerger:
        mg = self._mergers.get(id(module))
        if mg is None or mg.module is not module:
            mg = ModuleMerger(module)
            self._mergers[id(module)] = mg
        return mg


def stack_scheduled(stack: Stack) -> bool:
    return any(e.enabled and e.scheduled for e in stack.entries)


def _runtime_where_unmergeable(mergers: dict[str, ModuleMerger], desired, scheduled, results):
    """Experts with block-quantized (GGUF) weights take the whole stack through the runtime path (issue 10):
    their constant entries become runtime entries of constant strength, reported as mode "runtime"."""
    for expert, mg in mergers.items():
        params = desired.get(expert, {})
        if not params or all(mg.mergeable(n) for n in params):
            continue
        for name, contribs in params.items():
            for c in contribs:
                runtime_c = Contribution(c.key, c.patch, 1.0, c.weight)
                scheduled.setdefault(expert, {}).setdefault(c.key, []).append(runtime_c)
                row = results[c.key[3]]
                row.setdefault("mode_by_expert", {})[expert] = "runtime"
                row["mode"] = "runtime"
        desired[expert] = {}
    return desired, scheduled


def global_warnings_for(file: str, warnings: list[str]) -> list[str]:
    return [w for w in warnings if w.startswith(f"{file} ") or w.startswith(f"{file}:")]


def model_width_from_dir(folder: str | Path) -> int | None:
    cfg = transformer_config(folder)
    return int(cfg.get("num_attention_heads", 0)) * int(cfg.get("attention_head_dim", 0)) or None


__all__ = ["LoraManager", "slot_for"]
