"""Server-side state shared by every browser tab and API call: the engine (through its typed door) and
a per-model-type cache of the LoRA folder's listing, which client-named files are checked against."""
from __future__ import annotations

import json
import logging
import threading

from engine.port import EnginePort, LoraView, ModelSpec, ModelView
from engine.types import RequestError, Stack, WanStackError

log = logging.getLogger(__name__)
MAX_STACK_CHARS = 64 * 1024  # a stack of 64 entries is a few KB; larger text is not a stack


class UIContext:
    def __init__(self, engine: EnginePort, max_rows: int = 6):
        self.engine = engine
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._loras: dict[str | None, list[LoraView]] = {}
        self._coverage: dict[tuple[str, str, str | None], dict | None] = {}

    # ---- models -----------------------------------------------------------------------
    def models(self, refresh: bool = False) -> list[ModelView]:
        return self.engine.models(refresh)

    def usable_models(self, refresh: bool = False) -> list[ModelView]:
        return [m for m in self.models(refresh) if m.ok]

    def model(self, model_id: str) -> ModelView:
        """The server's record for a model id; RequestError if the client named anything else."""
        return self.engine.model(model_id)

    def spec_for(self, model_id: str) -> ModelSpec:
        spec = self.model(model_id).spec
        if spec is None:
            raise RequestError(f"model {model_id} cannot be used")
        return spec

    # ---- LoRAs ------------------------------------------------------------------------
    def loras(self, model_type: str | None, refresh: bool = False) -> list[LoraView]:
        """LoRA files with inspection for one model type (cached until refresh)."""
        with self._lock:
            if refresh:
                self._loras.clear()
                self._coverage.clear()
            cached = self._loras.get(model_type)
        if cached is not None:
            return cached
        views = self.engine.loras(model_type, refresh)  # file I/O outside the lock: a slow disk never stalls other tabs
        with self._lock:
            return self._loras.setdefault(model_type, views)

    def lora_files(self, model_type: str) -> list[str]:
        return [v.file for v in self.loras(model_type)]

    def compatible_files(self, model_type: str) -> list[str]:
        return [v.file for v in self.loras(model_type) if v.compatible]

    def lora_info(self, model_type: str, file: str | None) -> LoraView | None:
        return next((v for v in self.loras(model_type) if v.file == file), None)

    def coverage(self, model_type: str, file: str) -> dict | None:
        """Which of the file's keys match a model of this type (before any run), cached per file hash."""
        info = self.lora_info(model_type, file)
        if info is None or not info.compatible:
            return None
        key = (model_type, file, info.sha256)
        if key not in self._coverage:
            model = next((m for m in self.usable_models() if m.type == model_type), None)
            try:
                report = self.engine.inspect_lora(file, model.id) if model else {}
            except WanStackError as e:
                log.warning("could not inspect %s against %s: %s", file, model_type, e)
                report = {}
            self._coverage[key] = report.get("coverage")
        return self._coverage[key]

    # ---- the API's stack field ------------------------------------------------------------
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
        names = [p.name for p in self.engine.presets()]
        if text not in names:
            raise RequestError(f"stack {text!r} is neither JSON nor a saved preset; presets: {', '.join(names) or 'none'}")
        loaded = self.engine.load_preset(text, None)
        missing = [r["file"] for r in loaded.rows if r.get("status") == "missing"]
        if missing:
            raise RequestError(f"preset {text!r} names LoRA files that are not in the folder: {', '.join(missing)}")
        if loaded.preset.model_type != spec.type:
            raise RequestError(f"preset {text!r} is for {loaded.preset.model_type}; this model is {spec.type}")
        from ui.stack_logic import to_stack

        return to_stack(list(loaded.rows))
