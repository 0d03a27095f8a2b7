"""Stack planning: the one LoRA cap check, and what a stack contributes to each parameter of each expert.

Pure of module state: plans are made from parameter shapes (a live module's or a folder's headers), so
in-place application (engine/lora/session.py) and the streamed `lora merge` (bake.py) share them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.models.catalog import ModelSpec
from engine.lora.errors import LoraCapExceeded, LoraFormatError, LoraIncompatibleError
from engine.lora.formats import ParsedLora
from engine.lora.inspection import (
    Coverage, check_family, coverage, expert_hint, family_name, file_coverage, lora_width, width_of_shapes,
)
from engine.lora.library import LoraLibrary, Resolver, slot_for
from engine.lora.merge import Contribution
from engine.lora.schedule import constant_value, format_weight, is_constant, strength_for_expert
from engine.types import LoraEntry, RequestError, Stack

EXPERT_LABEL = {"high_noise": "high-noise expert", "low_noise": "low-noise expert", "single": "model"}


def cap_problem(spec: ModelSpec, stack: Stack) -> str | None:
    """The one LoRA cap rule: the refusal message when an expert would hold more enabled entries than
    the model type's cap, else None."""
    for expert in spec.experts:
        n = len(stack.enabled_for(expert))
        if n > spec.lora_cap:
            where = EXPERT_LABEL[expert] if spec.dual_expert else "model"
            return (f"LoRA cap reached: {spec.type} takes at most {spec.lora_cap} enabled LoRAs on the {where} "
                    f"(this stack has {n}). Disable or remove {n - spec.lora_cap}"
                    + (", move one to the other expert" if spec.dual_expert else "")
                    + f", or raise it with --lora-cap {spec.type}={n}.")
    return None


def check_stack(spec: ModelSpec, stack: Stack) -> list[str]:
    """Cap and routing checks before any model load. Raises LoraCapExceeded; returns warnings."""
    problem = cap_problem(spec, stack)
    if problem:
        raise LoraCapExceeded(problem)
    warnings: list[str] = []
    if not spec.dual_expert:
        for e in stack.entries:
            if e.enabled and e.applies_to in ("high_noise", "low_noise"):
                warnings.append(f"{e.file} is set to {e.applies_to}, but {spec.label} has one expert; it acts on that expert")
            if e.enabled and e.low_noise_weight is not None:
                warnings.append(f"{e.file}: low_noise_weight is ignored on {spec.label} (one expert); weight {format_weight(e.weight)} is used")
    return warnings


@dataclass
class StackPlan:
    """What a stack merges: expert -> parameter -> contributions (stack order), and one report row per entry."""

    desired: dict[str, dict[str, list[Contribution]]]
    rows: list[dict[str, Any]]
    hashes: dict[str, str]  # entry file -> sha256 of the files that load


def stack_hashes(library: LoraLibrary, stack: Stack, *, skip_failing: bool = False,
                 resolve: Resolver | None = None) -> dict[str, str]:
    """sha256 of every enabled entry's file (hashes are cached): what a stack's fingerprint is made of."""
    return _resolve_files(library, stack, skip_failing, resolve)[1]


def stack_scheduled(stack: Stack) -> bool:
    return any(e.enabled and e.scheduled for e in stack.entries)


def plan_stack(library: LoraLibrary, spec: ModelSpec, stack: Stack, shapes: dict[str, dict[str, tuple[int, ...]]],
               *, skip_failing: bool = False, resolve: Resolver | None = None, high_steps: int | None = None,
               allow_schedules: bool = True) -> StackPlan:
    """Plan `stack` for experts of these parameter shapes (e.g. merge.model_param_shapes of a folder).

    A constant weight is merged; a schedule gives contributions with a per-step strength function
    (runtime path); `high_steps` (how many steps the high-noise expert takes) places phase schedules.
    `allow_schedules=False` (baking a model) refuses scheduled entries.
    """
    bad = [e for e in shapes if e not in spec.experts]
    if bad:
        raise RequestError(f"experts {bad} are not experts of {spec.type} ({', '.join(spec.experts)})")
    global_warnings = check_stack(spec, stack)
    paths, hashes, rows = _resolve_files(library, stack, skip_failing, resolve)
    if not allow_schedules:
        scheduled = [e.file for e in stack.entries if e.enabled and e.scheduled]
        if scheduled:
            raise RequestError(
                f"{scheduled[0]} has a weight schedule; a baked model holds one fixed weight per LoRA, "
                "so give it a single number here (schedules apply at generation time)")
    library.pin_more(set(hashes.values()))  # the files being planned stay cached while the others load
    desired = _desired(library, spec, stack, shapes, paths, rows, skip_failing, high_steps)
    for row in rows:
        row["warnings"] = _warnings_for(row["file"], global_warnings) + row["warnings"]
    return StackPlan(desired, rows, hashes)


def _warnings_for(file: str, warnings: list[str]) -> list[str]:
    return [w for w in warnings if w.startswith(f"{file} ") or w.startswith(f"{file}:")]


def _resolve_files(library: LoraLibrary, stack: Stack, skip_failing: bool, resolve: Resolver | None):
    """Paths and sha256 of the enabled entries, and one report row per entry."""
    paths: dict[int, Path] = {}
    hashes: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for i, entry in enumerate(stack.entries):
        row = {"file": entry.file, "sha256": entry.sha256, "status": "disabled", "weights": {},
               "coverage": {}, "coverage_by_expert": {}, "warnings": [], "reason": ""}
        rows.append(row)
        if not entry.enabled:
            continue
        try:
            paths[i] = library.path_of(entry.file, resolve)
            if not paths[i].is_file():
                where = library.loras_dir if resolve is None else "the given path"
                raise LoraFormatError(f"LoRA file {entry.file} not found in {where}")
            hashes[entry.file] = row["sha256"] = library.sha256_of(paths[i])
        except (LoraFormatError, RequestError, OSError) as e:
            if not skip_failing:
                raise
            row.update(status="failed", reason=str(e))
            paths.pop(i, None)
    return paths, hashes, rows


def _desired(library: LoraLibrary, spec: ModelSpec, stack: Stack, shapes: dict[str, dict], paths: dict[int, Path],
             rows: list[dict[str, Any]], skip_failing: bool,
             high_steps: int | None = None) -> dict[str, dict[str, list[Contribution]]]:
    """Contributions per expert and parameter, in stack order; fills coverage into `rows`."""
    model_width = width_of_shapes(next(iter(shapes.values()))) if shapes else None
    desired: dict[str, dict[str, list[Contribution]]] = {name: {} for name in shapes}
    for i, entry in enumerate(stack.entries):
        row = rows[i]
        if i not in paths:
            continue
        try:
            parsed = library.load(paths[i])
            check_family(parsed, model_width, spec.label, entry.file)
            plan = _plan_entry(i, entry, parsed, spec, shapes, row, high_steps)
        except (LoraFormatError, LoraIncompatibleError) as e:
            if not skip_failing:
                raise
            row.update(status="failed", reason=str(e), warnings=row["warnings"] + [f"skipped: {e}"])
            continue
        for expert, contribs in plan.items():
            for c in contribs:
                desired[expert].setdefault(c.patch.target, []).append(c)
    return desired


def _plan_entry(i: int, entry: LoraEntry, parsed: ParsedLora, spec: ModelSpec, shapes: dict[str, dict],
                row: dict[str, Any], high_steps: int | None = None) -> dict[str, list[Contribution]]:
    """Coverage per expert and the contributions this entry adds; raises when nothing of it fits.

    A constant weight (a number or a list of equal values) is merged; a schedule gives contributions
    with a per-step strength function (runtime path)."""
    per: dict[str, Coverage] = {}
    plan: dict[str, list[Contribution]] = {}
    used_slots: set[str] = set()
    acting_applied = 0
    modes: dict[str, str] = {}
    for expert in shapes:
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
    image_keys = {k for c in per.values() for k, (_, why) in c.reasons.items() if why.startswith("image cross-attention")}
    if image_keys:
        row["warnings"].append(
            f"{family_name(lora_width(parsed))} I2V LoRA: {len(image_keys)} k_img/v_img keys have no target on {spec.label}")
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
