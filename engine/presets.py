"""Named LoRA stacks on disk: `presets/<slug>.json`, atomic writes, schema checks, Wan2GP `.lset` import.

Standard library only (plus the torch-free engine.types / engine.models.catalog), so `ui/` can import it.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from engine.models.catalog import CATALOG
from engine.fileio import atomic_write_text
from engine.types import LoraEntry, RequestError

log = logging.getLogger(__name__)

SCHEMA = 1
MAX_NAME_CHARS = 80
MAX_PRESET_BYTES = 1 << 20  # an import larger than this is not a preset
_KEYS = {"schema", "name", "model_type", "entries", "notes", "created", "updated"}
# Optional run settings of speed presets (engine/speed/presets.py checks and applies them); absent = not set.
_SETTINGS_KEYS = ("steps", "guidance", "guidance_2", "shift")
_KEYS |= set(_SETTINGS_KEYS)


class PresetError(RequestError):
    """A preset name, file or import is unusable; the message says which and what to do."""


@dataclass
class Preset:
    name: str
    model_type: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    notes: str = ""
    created: str = ""
    updated: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # steps / guidance / guidance_2 / shift, when set

    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema": SCHEMA,
            "name": self.name,
            "model_type": self.model_type,
            "entries": [dict(e) for e in self.entries],
            "notes": self.notes,
            "created": self.created,
            "updated": self.updated,
        }
        out.update({k: self.settings[k] for k in _SETTINGS_KEYS if self.settings.get(k) is not None})
        return out


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_name(name: Any) -> str:
    """A preset's display name, trimmed; refuses names that could address another folder."""
    if not isinstance(name, str) or not name.strip():
        raise PresetError("preset name is empty; type a name such as 'Fast anime'")
    name = name.strip()
    if len(name) > MAX_NAME_CHARS:
        raise PresetError(f"preset name is {len(name)} characters; keep it under {MAX_NAME_CHARS}")
    if "/" in name or "\\" in name or ".." in name or any(unicodedata.category(c)[0] == "C" for c in name):
        raise PresetError(
            f"preset name {name!r} contains a path separator, '..' or a control character; "
            "use letters, digits, spaces, '-' or '_'"
        )
    return name


def slugify(name: str) -> str:
    """File stem for a preset name: lowercase ASCII letters, digits, '-' and '_'."""
    name = check_name(name)
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9_-]+", "-", ascii_name.lower()).strip("-_")
    if not slug:
        raise PresetError(f"preset name {name!r} has no letters or digits to make a file name from; add some")
    return slug[:MAX_NAME_CHARS]


def check_lora_file(file: Any) -> str:
    """A LoRA path as stored in a preset: relative to the LoRA folder, POSIX separators, no '..'."""
    if not isinstance(file, str) or not file.strip():
        raise PresetError("a stack entry has no 'file'; every entry names a LoRA file in the LoRA folder")
    p = PurePosixPath(file.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", file):
        raise PresetError(
            f"LoRA file {file!r} is outside the LoRA folder; presets name files relative to it, e.g. 'style/anime.safetensors'"
        )
    return str(p)


def validate(data: Any, source: str = "preset") -> Preset:
    """Check a decoded preset object against schema 1 and return it; errors name the field and the fix."""
    if not isinstance(data, dict):
        raise PresetError(f"{source} is not a JSON object; a preset looks like {{\"schema\": 1, \"name\": ..., \"entries\": [...]}}")
    if data.get("schema") != SCHEMA:
        newer = isinstance(data.get("schema"), int) and data["schema"] > SCHEMA
        raise PresetError(f"{source} has schema {data.get('schema')!r}"
                          + (" from a newer WanStack" if newer else "")
                          + f"; this version reads schema {SCHEMA} (the file is left as it is)")
    unknown = set(data) - _KEYS
    if unknown:
        raise PresetError(f"{source} has unknown field(s) {sorted(unknown)}; allowed: {', '.join(sorted(_KEYS))}")
    name = check_name(data.get("name"))
    model_type = data.get("model_type")
    if model_type not in CATALOG:
        raise PresetError(f"{source} has model_type {model_type!r}; known types: {', '.join(sorted(CATALOG))}")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise PresetError(f"{source} field 'entries' must be a list of LoRA entries")
    checked = []
    for i, raw in enumerate(entries):
        try:
            entry = LoraEntry.from_dict(raw)
        except RequestError as e:
            raise PresetError(f"{source} entry {i + 1}: {e}") from None
        d = entry.to_dict()
        d["file"] = check_lora_file(entry.file)
        checked.append(d)
    for key in ("notes", "created", "updated"):
        if not isinstance(data.get(key, ""), str):
            raise PresetError(f"{source} field {key!r} must be text")
    from engine.speed.presets import check_settings

    try:
        settings = check_settings(data, source)
    except RequestError as e:
        raise PresetError(str(e)) from None
    return Preset(name, model_type, checked, data.get("notes", ""), data.get("created", ""), data.get("updated", ""),
                  settings)


def parse_json(raw: bytes | str, source: str = "uploaded file") -> Preset:
    """Decode and validate an exported preset (the import side of export)."""
    if len(raw) > MAX_PRESET_BYTES:
        raise PresetError(f"{source} is {len(raw)} bytes; a preset is a small JSON file under {MAX_PRESET_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PresetError(f"{source} is not valid JSON ({e}); export a preset from WanStack or fix the file") from None
    except RecursionError:
        raise PresetError(f"{source} is nested too deeply to be a preset") from None
    return validate(data, source)


def _phase_values(text: str, where: str) -> list[float]:
    """One Wan2GP phase: `0.9` or a time-based list `0.9,0.8,0.7` (spread evenly over the phase's steps)."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise PresetError(f"Wan2GP multiplier {text!r} for {where} has an empty value; write numbers like 0.9,0.8")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise PresetError(f"Wan2GP multiplier {text!r} for {where} is not a number") from None


def _weight(values: list[float]):
    """A one-value list is that number; a list of equal values stays a list (it round-trips) but acts as constant."""
    return values[0] if len(values) == 1 else values


def _constant(values: list[float]) -> bool:
    return all(v == values[0] for v in values)


def lset_tokens(mult: str) -> list[str]:
    """Wan2GP's multiplier text -> one token per LoRA: comment lines (#) dropped, `|` and whitespace separate."""
    lines = [ln.strip() for ln in mult.replace("\r", "").split("\n")]
    text = " ".join(ln for ln in lines if ln and not ln.startswith("#"))
    return text.replace("|", " ").split()


def parse_lset(raw: bytes | str, model_type: str, name: str, known_files: list[str] | None = None) -> Preset:
    """Turn a Wan2GP `.lset` file (JSON with `loras` and `loras_mult`) into a preset for `model_type`.

    `loras_mult` holds one token per LoRA. Without `;` a token covers the whole run: `1.2`, or a
    time-based list `0.9,0.8,0.7` that becomes a schedule. With `;` it gives one value or list per
    denoising phase. On a two-expert model Wan2GP's two phases are the high- and low-noise experts
    (`weight` and `low_noise_weight`, schedules kept). What a preset cannot say exactly gets a note:
    three guidance phases (Wan2GP splits two of them at a guidance threshold that WanStack does not
    have) and phases on a one-expert model. `known_files` maps bare file names onto paths in the
    LoRA folder.
    """
    if model_type not in CATALOG:
        raise PresetError(f"model type {model_type!r} is unknown; pick a model before importing")
    if len(raw) > MAX_PRESET_BYTES:
        raise PresetError(f".lset file is {len(raw)} bytes; expected a small JSON file")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PresetError(f".lset file is not valid JSON ({e})") from None
    except RecursionError:
        raise PresetError(".lset file is nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("loras"), list):
        raise PresetError(".lset file has no 'loras' list; it should look like {\"loras\": [...], \"loras_mult\": \"1 0.8\"}")
    mult = data.get("loras_mult", "")
    if not isinstance(mult, str):
        raise PresetError(".lset field 'loras_mult' must be text like '1;0 0;1 0.8'")
    tokens = lset_tokens(mult)
    dual = len(CATALOG[model_type].experts) == 2
    # Wan2GP's model_switch_phase: the phase after which the low-noise expert takes over (3-phase runs).
    switch_phase = data.get("model_switch_phase", 2)
    if switch_phase not in (1, 2):
        switch_phase = 2
    by_name = {PurePosixPath(f).name: f for f in known_files or []}
    notes = []
    entries = []
    for i, file in enumerate(data["loras"]):
        file = check_lora_file(file)
        file = by_name.get(PurePosixPath(file).name, file)
        token = tokens[i] if i < len(tokens) else "1"
        phases = [_phase_values(p, file) for p in token.split(";")]
        entry: dict[str, Any] = {"file": file, "weight": _weight(phases[0]), "applies_to": "both", "enabled": True}
        if len(phases) > 3:
            raise PresetError(f"Wan2GP multiplier {token!r} for {file} has {len(phases)} phases; Wan2GP has at most 3")
        if len(phases) >= 2 and not dual:
            joined = [v for ph in phases for v in ph]
            if not _constant(joined):
                notes.append(
                    f"{file}: phase multiplier {token!r} on a one-expert model: its phases are joined into the "
                    f"schedule {':'.join(f'{v:g}' for v in joined)} spread evenly over the steps "
                    "(Wan2GP switches phases at a guidance threshold, which WanStack does not have)")
            entry["weight"] = _weight(joined if not _constant(joined) else joined[:1])
        elif len(phases) >= 2:
            if len(phases) == 3:
                cut = switch_phase  # phases [0, cut) run on the high-noise expert
                high_parts, low_parts = phases[:cut], phases[cut:]
                join_side = high_parts if len(high_parts) == 2 else low_parts
                if not _constant([v for ph in join_side for v in ph]):
                    notes.append(
                        f"{file}: 3 guidance phases {token!r}: the two on the "
                        f"{'high' if len(high_parts) == 2 else 'low'}-noise expert are joined into one schedule spread "
                        "evenly over its steps (Wan2GP splits them at its guidance threshold, which WanStack does not have)")
                high = [v for ph in high_parts for v in ph]
                low = [v for ph in low_parts for v in ph]
                high = high[:1] if _constant(high) else high
                low = low[:1] if _constant(low) else low
            else:
                high, low = phases
            if high == [0.0] and low == [0.0]:
                entry.update(weight=0.0, enabled=False)
            elif low == [0.0]:
                entry.update(weight=_weight(high), applies_to="high_noise")
            elif high == [0.0]:
                entry.update(weight=_weight(low), applies_to="low_noise")
            elif high == low:
                entry["weight"] = _weight(high)
            else:
                entry.update(weight=_weight(high), low_noise_weight=_weight(low))
        try:
            LoraEntry.from_dict(entry)  # range check with the engine's own rules
        except RequestError as e:
            raise PresetError(f"Wan2GP multiplier {token!r}: {e}") from None
        entries.append(entry)
    prompt = data.get("prompt", "")
    if isinstance(prompt, str) and prompt.strip():
        notes.append("prompt from .lset: " + prompt.strip())
    now = _now()
    return Preset(check_name(name), model_type, entries, "\n".join(notes), now, now)


def _lset_value(weight) -> str:
    if isinstance(weight, (list, tuple)):
        return ",".join(f"{float(v):g}" for v in weight)
    return f"{float(weight):g}"


def to_lset(preset: Preset) -> str:
    """A Wan2GP `.lset` (JSON) of a preset: the inverse of parse_lset for everything a preset holds.

    Disabled entries are written with multiplier 0 (on both phases of a two-expert model).
    """
    dual = len(CATALOG[preset.model_type].experts) == 2
    loras, tokens = [], []
    for e in preset.entries:
        entry = LoraEntry.from_dict({k: v for k, v in e.items() if k in ("file", "weight", "applies_to",
                                                                         "low_noise_weight", "enabled", "sha256")})
        w, lw = _lset_value(entry.weight), None if entry.low_noise_weight is None else _lset_value(entry.low_noise_weight)
        if not entry.enabled:
            token = "0;0" if dual else "0"
        elif not dual:
            token = w
        elif entry.applies_to == "high_noise":
            token = f"{w};0"
        elif entry.applies_to == "low_noise":
            token = f"0;{w}"
        elif lw is not None:
            token = f"{w};{lw}"
        else:
            token = w
        loras.append(PurePosixPath(entry.file).name)
        tokens.append(token)
    return json.dumps({"loras": loras, "loras_mult": " ".join(tokens)}, indent=1)


@dataclass
class PresetSummary:
    name: str
    slug: str
    model_type: str
    entries: int
    updated: str
    problem: str = ""  # why this file cannot be used (newer schema, unknown field, damaged); it is left as it is


class PresetStore:
    """The presets folder. Every name from a client goes through slugify(), so no path escapes it."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._lock = threading.Lock()

    def path_for(self, name: str) -> Path:
        path = (self.root / f"{slugify(name)}.json").resolve()
        if path.parent != self.root.resolve():
            raise PresetError(f"preset name {name!r} would leave the presets folder; pick a plain name")
        return path

    def _read(self, path: Path) -> Preset | None:
        """The preset in `path`, None when there is no such file; PresetError when it cannot be used.

        Reading never changes a file: a preset from a newer version or a damaged one stays as it is.
        """
        try:
            if path.stat().st_size > MAX_PRESET_BYTES:
                raise PresetError(f"preset file {path.name} is {path.stat().st_size} bytes; a preset is under "
                                  f"{MAX_PRESET_BYTES} bytes")
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise PresetError(f"{path.name} is a folder, not a preset file") from None
        return parse_json(raw, f"preset file {path.name}")

    def list(self) -> list[PresetSummary]:
        """Every *.json in the folder; files this version cannot use are listed with the reason, untouched."""
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob("*.json")):
            try:
                preset = self._read(path)
            except PresetError as e:
                out.append(_unusable_summary(path, str(e)))
                continue
            if preset is not None:
                out.append(PresetSummary(preset.name, path.stem, preset.model_type, len(preset.entries), preset.updated))
        return out

    def names(self, model_type: str | None = None) -> list[str]:
        return [p.name for p in self.list() if model_type is None or p.model_type == model_type]

    def load(self, name: str) -> Preset:
        preset = self._read(self.path_for(name))
        if preset is None:
            known = ", ".join(self.names()) or "none saved yet"
            raise PresetError(f"preset {name!r} not found; saved presets: {known}")
        return preset

    def exists(self, name: str) -> bool:
        return self.path_for(name).exists()

    def save(self, preset: Preset, overwrite: bool = True) -> Path:
        """Write the preset atomically. Refuses a name whose file holds another preset ("My Preset" and
        "my-preset!!" share my-preset.json) or a file this version cannot read (it is kept as it is)."""
        checked = validate({**preset.to_dict(), "created": preset.created or "", "updated": preset.updated or ""})
        path = self.path_for(checked.name)
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                old = self._read(path)
            except PresetError as e:
                raise PresetError(f"cannot save {checked.name!r}: its file {path.name} holds a preset this version "
                                  f"cannot read ({e}); it is kept as it is, so pick another name") from None
            if old is not None and old.name != checked.name:
                raise PresetError(f"preset name {checked.name!r} uses the same file ({path.name}) as the existing "
                                  f"preset {old.name!r}; pick a name that differs in letters or digits, or rename "
                                  f"{old.name!r} first")
            if old is not None and not overwrite:
                raise PresetError(f"preset {checked.name!r} already exists; pick another name or overwrite it")
            checked.created = (old.created if old else "") or checked.created or _now()
            checked.updated = _now()
            try:
                atomic_write_text(path, json.dumps(checked.to_dict(), indent=2, ensure_ascii=False) + "\n")
            except OSError as e:
                raise PresetError(f"could not save preset {checked.name!r} in {self.root}: {e.strerror}; "
                                  "the previous version (if any) is unchanged") from None
        return path

    def delete(self, name: str) -> None:
        path = self.path_for(name)
        with self._lock:
            if not path.exists():
                raise PresetError(f"preset {name!r} not found; nothing deleted")
            path.unlink()

    def rename(self, old: str, new: str) -> Preset:
        preset = self.load(old)
        new = check_name(new)
        old_path, new_path = self.path_for(old), self.path_for(new)
        if new_path != old_path and new_path.exists():
            raise PresetError(f"preset {new!r} already exists (file {new_path.name}); delete it first or pick another name")
        if new_path == old_path:  # same file, new spelling ("my preset" -> "My Preset"): rewrite it in place
            preset.name = new
            with self._lock:
                atomic_write_text(new_path, json.dumps({**preset.to_dict(), "updated": _now()}, indent=2,
                                                       ensure_ascii=False) + "\n")
            return self.load(new)
        preset.name = new
        self.save(preset)
        with self._lock:
            old_path.unlink(missing_ok=True)
        return self.load(new)

    def duplicate(self, name: str, new: str | None = None) -> Preset:
        preset = self.load(name)
        new = check_name(new or self._free_copy_name(preset.name))
        if self.exists(new):
            raise PresetError(f"preset {new!r} already exists; pick another name")
        preset.name, preset.created = new, ""
        self.save(preset, overwrite=False)
        return self.load(new)

    def _free_copy_name(self, name: str) -> str:
        for i in range(1, 1000):
            candidate = f"{name} copy" if i == 1 else f"{name} copy {i}"
            candidate = candidate[-MAX_NAME_CHARS:]
            if not self.exists(candidate):
                return candidate
        raise PresetError(f"too many copies of {name!r}; rename some")

    def export_path(self, name: str) -> Path:
        """The preset's own file, for a download."""
        path = self.path_for(name)
        if self._read(path) is None:
            raise PresetError(f"preset {name!r} not found; nothing to export")
        return path

    def import_bytes(self, raw: bytes, filename: str, model_type: str | None = None,
                     known_files: list[str] | None = None, overwrite: bool = False) -> Preset:
        """Import an uploaded `.json` preset or Wan2GP `.lset` file and save it."""
        if filename.lower().endswith(".lset"):
            if model_type is None:
                raise PresetError("a .lset file does not say which model it is for; pick a model first")
            stem = PurePosixPath(filename.replace("\\", "/")).stem
            preset = parse_lset(raw, model_type, stem, known_files)
        else:
            preset = parse_json(raw, f"uploaded file {PurePosixPath(filename).name}")
        if not overwrite and self.exists(preset.name):
            preset.name = self._free_copy_name(preset.name)
        self.save(preset)
        return self.load(preset.name)


def _unusable_summary(path: Path, problem: str) -> PresetSummary:
    """A listing row for a preset file this version cannot use: its own name and type where it says them."""
    name, model_type = path.stem, "unknown"
    try:
        data = json.loads(path.read_bytes()[:MAX_PRESET_BYTES])
        if isinstance(data, dict):
            if isinstance(data.get("name"), str) and data["name"].strip():
                name = data["name"].strip()[:MAX_NAME_CHARS]
            if isinstance(data.get("model_type"), str):
                model_type = data["model_type"][:80]
    except (OSError, ValueError, RecursionError):
        pass
    return PresetSummary(name, path.stem, model_type, 0, "", problem=problem)


def mark_entries(entries: list[dict[str, Any]], available: dict[str, str | None]) -> list[dict[str, Any]]:
    """Per entry, whether its file is in the LoRA folder and unchanged.

    `available` maps LoRA files (relative to the folder) to their sha256 (None if not hashed).
    Returns copies with `status` 'ok', 'missing' or 'changed' and a `problem` sentence; nothing is dropped.
    """
    out = []
    for e in entries:
        row = dict(e)
        file = e.get("file", "")
        if file not in available:
            row.update(status="missing", problem=f"{file} is not in the LoRA folder; copy it back or pick another file")
        elif e.get("sha256") and available[file] and available[file] != e["sha256"]:
            row.update(status="changed", problem=f"{file} changed since the preset was saved (sha256 differs); check the result")
        else:
            row.update(status="ok", problem="")
        out.append(row)
    return out
