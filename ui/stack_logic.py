"""Pure stack-editor rules (no gradio): rows as plain dicts, per-expert cap counts, pair offers, reasons."""
from __future__ import annotations

import re
from typing import Any

from engine.port import ModelSpec
from engine.types import LoraEntry, RequestError, Stack

EXPERT_LABEL = {"high_noise": "high-noise expert", "low_noise": "low-noise expert", "single": "model"}
ROW_FIELDS = ("file", "weight", "applies_to", "low_noise_weight", "enabled")


def new_row(file: str = "", weight: float = 1.0, applies_to: str = "both") -> dict[str, Any]:
    return {"file": file, "weight": weight, "applies_to": applies_to, "low_noise_weight": None, "enabled": True}


def to_stack(rows: list[dict[str, Any]]) -> Stack:
    """Rows with a file picked, as the engine's Stack (raises RequestError naming the bad row)."""
    entries = []
    for i, row in enumerate(rows):
        if not row.get("file"):
            continue
        clean = {k: row.get(k) for k in ROW_FIELDS if row.get(k) is not None}
        if row.get("sha256"):
            clean["sha256"] = row["sha256"]
        try:
            entries.append(LoraEntry.from_dict(clean))
        except RequestError as e:
            raise RequestError(f"LoRA row {i + 1}: {e}") from None
    return Stack(tuple(entries))


def counts(rows: list[dict[str, Any]], spec: ModelSpec) -> dict[str, int]:
    """Enabled, picked entries acting on each expert: what the cap limits."""
    stack = Stack(tuple(LoraEntry(r["file"], applies_to=r.get("applies_to") or "both")
                        for r in rows if r.get("file") and r.get("enabled", True)))
    return {expert: len(stack.enabled_for(expert)) for expert in spec.experts}


def cap_text(rows: list[dict[str, Any]], spec: ModelSpec) -> str:
    """'2/2 on high-noise expert · 1/2 on low-noise expert'."""
    return " · ".join(f"{n}/{spec.lora_cap} on {EXPERT_LABEL[e]}" for e, n in counts(rows, spec).items())


def over_cap(rows: list[dict[str, Any]], spec: ModelSpec, cap_problem) -> str | None:
    """The engine's refusal message when some expert would hold more than the cap, else None.
    `cap_problem` is the engine's one cap rule (EnginePort.cap_problem)."""
    stack = Stack(tuple(LoraEntry(r["file"], applies_to=r.get("applies_to") or "both", enabled=bool(r.get("enabled", True)))
                        for r in rows if r.get("file")))
    return cap_problem(spec.type, stack)


def can_add(rows: list[dict[str, Any]], spec: ModelSpec, max_rows: int, cap_problem) -> str | None:
    """Why another enabled row cannot be added (None if it can)."""
    if len(rows) >= max_rows:
        return f"the editor holds {max_rows} rows; remove one first"
    full = [e for e, n in counts(rows, spec).items() if n >= spec.lora_cap]
    if len(full) == len(spec.experts):  # a new row could still go to a free expert otherwise
        return over_cap(rows + [new_row("(new)")], spec, cap_problem)
    return None


def default_applies_to(rows: list[dict[str, Any]], spec: ModelSpec) -> str:
    """'both' unless one expert is full, then the one with room."""
    if not spec.dual_expert:
        return "both"
    n = counts(rows, spec)
    free = [e for e in spec.experts if n[e] < spec.lora_cap]
    return "both" if len(free) == len(spec.experts) else free[0]


def move(rows: list[dict[str, Any]], index: int, delta: int) -> list[dict[str, Any]]:
    rows = list(rows)
    target = index + delta
    if 0 <= index < len(rows) and 0 <= target < len(rows):
        rows[index], rows[target] = rows[target], rows[index]
    return rows


_HIGH = re.compile(r"high", re.IGNORECASE)
_LOW = re.compile(r"low", re.IGNORECASE)


def pair_partner(file: str, available: list[str]) -> str | None:
    """For a '...high...' file its '...low...' partner in the folder (and the other way round), matching
    the case of each hit; the hit nearest the end (the file name beats the folder) is tried first."""
    if not file:
        return None
    for pattern, other in ((_HIGH, "low"), (_LOW, "high")):
        hits = list(pattern.finditer(file))
        if not hits:
            continue

        def swap(m: re.Match, other=other) -> str:
            s = m.group(0)
            return other.upper() if s.isupper() else other.capitalize() if s[0].isupper() else other

        candidates = [file[: m.start()] + swap(m) + file[m.end():] for m in reversed(hits)] + [pattern.sub(swap, file)]
        found = next((c for c in candidates if c in available and c != file), None)
        if found:
            return found
    return None


def clamp_slider(weight: float) -> float:
    return max(-2.0, min(2.0, float(weight)))


def human_bytes(n: int | None) -> str:
    if not n:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _count(value) -> int:
    return len(value) if isinstance(value, (list, tuple, dict)) else int(value or 0)


def count_text(cov: dict, verb: str) -> str:
    """'40/40 keys applied (2 skipped, 1 unmatched)'; skipped/unmatched may be counts or lists of keys."""
    applied, skipped, unmatched = _count(cov.get("applied")), _count(cov.get("skipped")), _count(cov.get("unmatched"))
    total = cov.get("total") or applied + skipped + unmatched
    text = f"{applied}/{total} keys {verb}"
    if skipped or unmatched:
        text += f" ({skipped} skipped, {unmatched} unmatched)"
    return text
