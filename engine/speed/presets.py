"""Speed presets: a preset may set steps, guidance (and guidance_2) and shift besides its stack.

engine/presets.py stores them (optional top-level fields, absent in older files); this module checks them,
applies them to a request where the user did not set the value explicitly, and says what changed.
Torch-free, so the UI can use it.
"""
from __future__ import annotations

import dataclasses
from pathlib import PurePosixPath
from typing import Any

from engine.types import RequestError

SETTINGS_FIELDS = ("steps", "guidance", "guidance_2", "shift")
_RANGES = {"steps": (1, 200), "guidance": (0.0, 30.0), "guidance_2": (0.0, 30.0), "shift": (0.1, 50.0)}


def check_settings(data: dict[str, Any], source: str = "preset") -> dict[str, Any]:
    """The run settings a preset object carries (only those present), range-checked like a request."""
    out: dict[str, Any] = {}
    for name in SETTINGS_FIELDS:
        if data.get(name) is None:
            continue
        value = data[name]
        low, high = _RANGES[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise RequestError(f"{source} field {name!r} must be a number, got {value!r}")
        if name == "steps" and int(value) != value:
            raise RequestError(f"{source} field 'steps' must be a whole number, got {value!r}")
        if not low <= value <= high:
            raise RequestError(f"{source} field {name!r} is {value}; it must be between {low:g} and {high:g}")
        out[name] = int(value) if name == "steps" else float(value)
    return out


def apply_settings(request, settings: dict[str, Any], spec, explicit: set[str] | frozenset = frozenset(),
                   preset_name: str = "preset"):
    """`request` with the preset's settings filled in, except fields in `explicit` (set by the user).

    Returns (request, changes): one sentence per field the preset changed, against what the run would have
    used without it (the request's value or the model's default), e.g. "steps 40 -> 4 (preset Lightning 4-step)".
    """
    changes: list[str] = []
    updates: dict[str, Any] = {}
    for name, value in settings.items():
        if name in explicit or (name == "guidance_2" and not spec.dual_expert):
            continue
        before = getattr(request, name)
        before = getattr(spec, name) if before is None else before
        updates[name] = value
        if before != value:
            changes.append(f"{name} {before:g} -> {value:g} (preset {preset_name})")
    return dataclasses.replace(request, **updates), changes


def locate_files(entries: list[dict[str, Any]], available: list[str]) -> list[dict[str, Any]]:
    """Entries whose file is not at its path in the LoRA folder but whose file name is there exactly once
    (in a sub-folder) point to that copy; the rest are left as they are for mark_entries to flag as missing."""
    by_name: dict[str, list[str]] = {}
    for path in available:
        by_name.setdefault(PurePosixPath(path).name, []).append(path)
    present = set(available)
    out = []
    for e in entries:
        row = dict(e)
        hits = by_name.get(PurePosixPath(row.get("file", "")).name, [])
        if row.get("file") not in present and len(hits) == 1:
            row["file"] = hits[0]
        out.append(row)
    return out
