"""A torch-free engine for UI tests: implements engine.port.EnginePort in memory, so UI code is exercised
through exactly the door the real facade offers (no probing, no missing methods)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from engine.models.catalog import get_spec, with_lora_cap
from engine.lora.planning import cap_problem, check_stack
from engine.port import (
    Done, EventCallback, Failed, LoraView, MemoryView, ModelView, OutputView, PresetLoad, PresetView, ValidatedRequest,
)
from engine.presets import Preset, PresetStore, mark_entries
from engine.run.request import resolve_request
from engine.types import GenerationCancelled, GenerationRequest, GenerationResult, RequestError, Stack, WanStackError

T2V = "demo-wan2.1-t2v-1.3b"
A14B = "demo-wan2.2-t2v-a14b"


class FakeEngine:
    """Models and LoRAs given in the constructor, presets in a real PresetStore under `root`, and a
    generation that plays `script(request, emit)` (default: three steps and a result)."""

    def __init__(self, root: Path, models: list[tuple[str, str]] | None = None, loras: list[LoraView] | None = None,
                 script: Callable | None = None, caps: dict[str, int] | None = None):
        self.root = Path(root)
        self._models = [(mid, mtype) for mid, mtype in (models if models is not None else [(T2V, T2V)])]
        self._loras = list(loras or [])
        self._caps = caps or {}
        self.store = PresetStore(self.root / "presets")
        self.script = script
        self.cancelled = threading.Event()
        self.validated: list[ValidatedRequest] = []
        self.past_runs: list[OutputView] = []  # what outputs() lists; tests set it and outputs_stamp
        self.outputs_stamp: str | None = "0"

    # settings the page shows
    @property
    def offload(self) -> str:
        return "auto"

    @property
    def loras_dir(self) -> str:
        return str(self.root / "loras")

    # models
    def _spec(self, model_type):
        return with_lora_cap(get_spec(model_type), self._caps)

    def models(self, refresh: bool = False) -> list[ModelView]:
        return [ModelView(mid, mtype, True, demo=mtype.startswith("demo-"), label=mtype, spec=self._spec(mtype))
                for mid, mtype in self._models]

    def model(self, model_id: str) -> ModelView:
        for m in self.models():
            if m.id == model_id:
                return m
        raise RequestError(f"model {model_id!r} not found; available: {', '.join(m.id for m in self.models())}")

    # LoRAs
    def loras(self, model_type: str | None, refresh: bool = False) -> list[LoraView]:
        return list(self._loras)

    def inspect_lora(self, file: str, model: str | None = None) -> dict[str, Any]:
        return {"file": file, "coverage": {"applied": 4, "total": 4}}

    def cap_problem(self, model_type: str, stack: Stack) -> str | None:
        return cap_problem(self._spec(model_type), stack)

    def merge_stack(self, model, stack, name, *, dtype=None, on_progress=None) -> dict[str, Any]:
        return {"out": str(self.root / "models" / name), "seconds": 0.0}

    # presets
    def presets(self) -> list[PresetView]:
        return [self._preset_view(s.name) for s in self.store.list()]

    def _preset_view(self, name: str) -> PresetView:
        p = self.store.load(name)
        return PresetView(p.name, p.model_type, tuple(p.entries), p.notes, p.updated, dict(p.settings))

    def load_preset(self, name: str, current_model: str | None) -> PresetLoad:
        preset = self._preset_view(name)
        model = next((m for m in self.models() if m.type == preset.model_type), None)
        available = {v.file: v.sha256 for v in self._loras}
        rows = mark_entries(list(preset.entries), available)
        notes = tuple(r["problem"] for r in rows if r["status"] != "ok")
        return PresetLoad(preset, tuple(rows), notes, model)

    def save_preset(self, name: str, model_type: str, stack: Stack, notes: str | None = None,
                    settings: dict[str, Any] | None = None) -> PresetView:
        old = self.store.load(name) if name and self.store.exists(name) else None
        if notes is None:
            notes = old.notes if old else ""
        if settings is None:
            settings = dict(old.settings) if old else {}
        self.store.save(Preset(name, model_type, stack.to_list(), notes, settings=dict(settings)))
        return self._preset_view(name)

    def rename_preset(self, name: str, new_name: str) -> PresetView:
        return self._preset_view(self.store.rename(name, new_name).name)

    def duplicate_preset(self, name: str, new_name: str | None = None) -> PresetView:
        return self._preset_view(self.store.duplicate(name, new_name).name)

    def delete_preset(self, name: str) -> None:
        self.store.delete(name)

    def export_preset(self, name: str) -> Path:
        return self.store.export_path(name)

    def import_preset(self, raw: bytes, filename: str, model_type: str | None) -> PresetView:
        return self._preset_view(self.store.import_bytes(raw, filename, model_type).name)

    # runs
    def validate(self, request: GenerationRequest) -> ValidatedRequest:
        m = self.model(request.model)
        spec = self._spec(m.type)
        known = {v.file for v in self._loras if v.compatible}
        for e in request.stack.entries:
            if e.file not in known:
                raise RequestError(f"LoRA {e.file} is not in the LoRA folder")
        warnings = check_stack(spec, request.stack)
        checked = ValidatedRequest(request, m, spec, resolve_request(request, spec), tuple(warnings))
        self.validated.append(checked)
        return checked

    def generate(self, request, on_event: EventCallback | None = None, *, out_path=None,
                 stream_video: bool = False) -> GenerationResult:
        emit = on_event or (lambda event: None)
        try:
            if self.script is None:
                raise WanStackError("this fake engine has no generation script")
            result = self.script(request, emit, self)
        except GenerationCancelled as e:
            emit(Failed(str(e), cancelled=True))
            raise
        except WanStackError as e:
            emit(Failed(str(e)))
            raise
        except Exception as e:
            emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            raise
        emit(Done(result))
        return result

    def cancel(self) -> None:
        self.cancelled.set()

    def release(self) -> None:
        pass

    def outputs(self, limit: int = 60) -> list[OutputView]:
        return list(self.past_runs)

    def outputs_version(self) -> str | None:
        return self.outputs_stamp

    def vram(self) -> MemoryView:
        return MemoryView(reason="no GPU in tests")

    def streaming_problem(self) -> str | None:
        return None
