"""Server-side state shared by every browser tab and API call: the engine, the preset store and the
server's own lists of models and LoRAs, which every name sent by a client is checked against."""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from engine.catalog import ModelSpec
from engine.presets import PresetError, PresetStore, mark_entries
from engine.types import RequestError, Stack, WanStackError
from ui import stack_logic

log = logging.getLogger(__name__)
MAX_STACK_CHARS = 64 * 1024  # a stack of 64 entries is a few KB; larger text is not a stack


class UIContext:
    def __init__(self, engine, max_rows: int = 6):
        self.engine = engine
        self.settings = engine.settings
        self.store = PresetStore(self.settings.presets_dir)
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._loras: dict[str, list[dict[str, Any]]] = {}
        self._coverage: dict[tuple[str, str, str | None], dict | None] = {}

    # ---- models -----------------------------------------------------------------------
    def models(self) -> list:
        return self.engine.list_models()

    def usable_models(self) -> list:
        return [m for m in self.models() if m.ok]

    def model(self, model_id: str):
        """The server's record for a model id; RequestError if the client named anything else."""
        return self.engine.find_model(model_id)

    def spec_for(self, model_id: str) -> ModelSpec:
        return self.engine.spec(self.model(model_id).type)

    @staticmethod
    def model_label(info) -> str:
        tag = "random weights" if info.demo else info.type
        return f"{info.id} · {tag}"

    # ---- LoRAs ------------------------------------------------------------------------
    def loras(self, model_type: str, refresh: bool = False) -> list[dict[str, Any]]:
        """LoRA files with inspection for one model type (cached until refresh)."""
        with self._lock:
            if refresh:
                self._loras.clear()
                self._coverage.clear()
            cached = self._loras.get(model_type)
        if cached is not None:
            return cached
        rows = self._scan(model_type)  # file I/O outside the lock: a slow disk never stalls other tabs
        with self._lock:
            return self._loras.setdefault(model_type, rows)

    def _scan(self, model_type: str) -> list[dict[str, Any]]:
        if hasattr(self.engine, "list_loras"):
            return [dict(d) for d in self.engine.list_loras(model_type)]
        root = Path(self.settings.loras_dir)
        files = sorted(p for p in root.rglob("*.safetensors") if p.is_file()) if root.is_dir() else []
        return [
            {"file": p.relative_to(root).as_posix(), "compatible": True, "size_bytes": p.stat().st_size,
             "reason": "", "rank": None, "family": "not inspected (LoRA engine not available yet)",
             "trigger_words": [], "sha256": None}
            for p in files
        ]

    def lora_files(self, model_type: str) -> list[str]:
        return [d["file"] for d in self.loras(model_type)]

    def compatible_files(self, model_type: str) -> list[str]:
        return [d["file"] for d in self.loras(model_type) if d.get("compatible", True)]

    def lora_info(self, model_type: str, file: str) -> dict[str, Any] | None:
        return next((d for d in self.loras(model_type) if d["file"] == file), None)

    def coverage(self, model_type: str, file: str) -> dict | None:
        """Which of the file's keys match a model of this type (before any run), cached per file hash."""
        info = self.lora_info(model_type, file)
        if info is None or not info.get("compatible", True) or not hasattr(self.engine, "inspect_lora"):
            return None
        key = (model_type, file, info.get("sha256"))
        if key not in self._coverage:
            model = next((m for m in self.usable_models() if m.type == model_type), None)
            try:
                report = self.engine.inspect_lora(file, model.id) if model else {}
            except WanStackError as e:
                log.warning("could not inspect %s against %s: %s", file, model_type, e)
                report = {}
            self._coverage[key] = report.get("coverage")
        return self._coverage[key]

    def check_stack(self, spec: ModelSpec, stack: Stack) -> list[str]:
        """Every file is one the server listed and compatible; caps hold. RequestError otherwise.
        Returns the engine's warnings (e.g. a high-noise LoRA set to act on both experts)."""
        known = {d["file"]: d for d in self.loras(spec.type)}
        for e in stack.entries:
            info = known.get(e.file)
            if info is None:
                names = ", ".join(sorted(known)) or "none (the LoRA folder is empty)"
                raise RequestError(f"unknown LoRA {e.file!r}: not in the server's LoRA folder; available: {names}")
            if not info.get("compatible", True):
                raise RequestError(f"LoRA {e.file} does not fit {spec.type}: {info.get('reason')}")
        rows = [e.to_dict() for e in stack.entries]
        message = stack_logic.over_cap(rows, spec)
        if message:
            raise RequestError(message)
        if hasattr(self.engine, "check_stack"):
            return list(self.engine.check_stack(spec.type, stack) or [])
        return []

    # ---- presets ----------------------------------------------------------------------
    def preset_choices(self) -> list[tuple[str, str]]:
        return [(f"{p.name} · {p.model_type}", p.name) for p in self.store.list()]

    def preset_rows(self, name: str, spec: ModelSpec) -> tuple[list[dict[str, Any]], list[str]]:
        """A saved stack as editor rows, with missing/changed files marked; plus notes for the user."""
        if name not in self.store.names():
            raise PresetError(f"preset {name!r} not found; saved presets: {', '.join(self.store.names()) or 'none'}")
        preset = self.store.load(name)
        notes = []
        if preset.model_type != spec.type:
            notes.append(f"preset {preset.name!r} was saved for {preset.model_type}; this model is {spec.type}")
        available = {d["file"]: d.get("sha256") for d in self.loras(spec.type)}
        rows = mark_entries(preset.entries, available)
        for r in rows:
            if r["status"] != "ok":
                notes.append(r["problem"])
            r.setdefault("applies_to", "both")
            r.setdefault("enabled", True)
            r.setdefault("low_noise_weight", None)
        return rows, notes

    def stack_from_text(self, text: str, spec: ModelSpec) -> Stack:
        """API `stack`: JSON list of entries, or the name of a saved preset."""
        text = (text or "").strip()
        if not text:
            return Stack()
        if len(text) > MAX_STACK_CHARS:
            raise RequestError(f"stack is {len(text)} characters; at most {MAX_STACK_CHARS} are accepted")
        if text[0] in "[{":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise RequestError(f"stack is not valid JSON ({e}); send a list like [{{\"file\": \"a.safetensors\", \"weight\": 1}}] or a preset name") from None
            except RecursionError:
                raise RequestError("stack is nested too deeply; send a flat list of entries") from None
            if isinstance(rows, dict):
                rows = rows.get("entries", rows)
            return Stack.from_list(rows)
        if text not in self.store.names():
            raise RequestError(
                f"stack {text!r} is neither JSON nor a saved preset; presets: {', '.join(self.store.names()) or 'none'}"
            )
        rows, _ = self.preset_rows(text, spec)
        missing = [r["file"] for r in rows if r["status"] == "missing"]
        if missing:
            raise RequestError(f"preset {text!r} names LoRA files that are not in the folder: {', '.join(missing)}")
        return stack_logic.to_stack(rows)
