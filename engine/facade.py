"""The one object the UI (and app.py) talks to: models, LoRAs, presets, memory, outputs and generation.

`Engine` implements `engine.port.EnginePort`: typed views in, typed events and views out (see
engine/port.py). Heavy imports happen inside methods, so `import engine.facade` stays torch-free.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.models.catalog import ModelSpec, get_spec, with_lora_cap
from engine.port import (
    Done, EventCallback, Failed, LoraView, MemoryView, ModelView, OutputView, PresetLoad, PresetView,
    ValidatedRequest,
)
from engine.types import GenerationCancelled, GenerationRequest, GenerationResult, RequestError, Stack, WanStackError

log = logging.getLogger(__name__)


@dataclass
class Settings:
    models_dir: Path = Path("models")
    loras_dir: Path = Path("loras")
    presets_dir: Path = Path("presets")
    outputs_dir: Path = Path("outputs")
    data_dir: Path = Path("data")  # the demo model is built here when models/ has no real model
    offload: str = "auto"
    lora_caps: dict[str, int] = field(default_factory=dict)
    vram_reserve_bytes: int = 1 << 30
    # The CLI names LoRA files by the user's own paths; the UI and API only by paths inside loras_dir.
    allow_lora_paths_outside: bool = False
    ignore_memory_plan: bool = False  # --ignore-memory-plan: run requests the memory plan says cannot fit
    comfyui_dir: Path | None = None  # an existing ComfyUI models/ folder (--comfyui): its models are listed too
    # Speed defaults for requests that say "auto" (engine/speed): app.py --attention / --compile.
    attention: str = "auto"
    compile: str = "auto"
    compile_backend: str = "inductor"


class Engine:
    """The facade. One generation at a time; the model list is scanned once and on `models(refresh=True)`."""

    DEMO_ARCHS = ("wan2.2-t2v-a14b", "wan2.1-t2v-1.3b")

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self._lock = threading.Lock()  # one generation at a time
        self._scan_lock = threading.Lock()
        self._generator = None
        self._library = None
        self._presets = None
        self._models: list | None = None  # engine.models.detect.ModelInfo, cached until a rescan

    # ---- settings the page shows -------------------------------------------------------------
    @property
    def offload(self) -> str:
        return self.settings.offload

    @property
    def loras_dir(self) -> str:
        return str(self.settings.loras_dir)

    # ---- models -------------------------------------------------------------------------
    def model_infos(self, refresh: bool = False) -> list:
        """Detected models (engine.models.detect.ModelInfo) in models_dir and the data folder's demo models."""
        from engine.models.detect import scan

        with self._scan_lock:
            if self._models is None or refresh:
                found = scan(self.settings.models_dir, self.settings.comfyui_dir)
                demo_root = self.settings.data_dir / "demo-models"
                if demo_root.is_dir():
                    found += scan(demo_root)
                self._models = found
            return list(self._models)

    def models(self, refresh: bool = False) -> list[ModelView]:
        return [self._view(m) for m in self.model_infos(refresh)]

    def model(self, model_id: str) -> ModelView:
        return self._view(self.find_model(model_id))

    def _view(self, info) -> ModelView:
        spec = self.spec(info.type) if info.ok and info.type else None
        return ModelView(id=info.id, type=info.type, ok=info.ok, reason=info.reason, demo=info.demo,
                         label=info.label, spec=spec, source=info.source, storage_label=info.storage_label,
                         storage=info.storage, files={c: Path(f).name for c, f in info.files.items()})

    def ensure_demo_model(self) -> list:
        """Build the demo models (and their demo LoRAs) into the data folder when models/ holds no
        usable real model. Returns the demo ModelInfos built or found; [] when a real model exists."""
        from engine.models.demo import build_demo_model
        from engine.models.detect import detect

        if any(m.ok and not m.demo for m in self.model_infos(refresh=True)):
            return []
        infos = []
        for arch in self.DEMO_ARCHS:
            out = self.settings.data_dir / "demo-models" / f"demo-{arch}"
            if not (out / "model_index.json").exists():
                log.info("building the demo model %s (random weights) in %s", arch, out)
                build_demo_model(out, arch, loras_dir=self.settings.loras_dir)
            infos.append(detect(out))
        self.model_infos(refresh=True)
        return infos

    def find_model(self, model: str):
        """Resolve a model id (folder name as listed) or a path the server itself listed. A name not in
        the cached list triggers one rescan (a model added by the CLI or the Tools tab)."""
        for refresh in (False, True):
            for info in self.model_infos(refresh):
                if model in (info.id, info.path):
                    if not info.ok:
                        raise RequestError(f"model {info.id} cannot be used: {info.reason}")
                    return info
        names = ", ".join(m.id for m in self.model_infos() if m.ok) or "none"
        raise RequestError(f"model {model!r} not found; available: {names}")

    def spec(self, model_type: str) -> ModelSpec:
        return with_lora_cap(get_spec(model_type), self.settings.lora_caps)

    # ---- LoRAs -----------------------------------------------------------------------------
    @property
    def library(self):
        """The one LoraLibrary (paths, hashes, parsed-file cache) shared with the generator."""
        if self._library is None:
            from engine.lora.library import LoraLibrary

            extra = {}
            if self.settings.comfyui_dir is not None and (Path(self.settings.comfyui_dir) / "loras").is_dir():
                extra["comfyui"] = Path(self.settings.comfyui_dir) / "loras"  # --comfyui: its loras/ joins ours
            self._library = LoraLibrary(self.settings.loras_dir, extra_dirs=extra)
        return self._library

    def loras(self, model_type: str | None, refresh: bool = False) -> list[LoraView]:
        """LoRA files in loras_dir (relative paths) with their inspection, and whether they fit the model type.
        Headers are parsed once per file content (by sha256), so a rescan only reads new or changed files."""
        del refresh  # every call lists the folder; unchanged files come from the library's cache
        return [LoraView.from_row(r) for r in self.library.list_loras(self.spec(model_type) if model_type else None)]

    def inspect_lora(self, file: str, model: str | None = None) -> dict[str, Any]:
        """Full inspection of one file in loras_dir; with a model id, coverage against that model."""
        path = self.library.path_of(file)
        if not path.is_file():
            raise RequestError(f"LoRA {file} is not in {self.settings.loras_dir}; press rescan or pick another")
        return self.library.inspect(path, self.find_model(model) if model else None)

    def cap_problem(self, model_type: str, stack: Stack) -> str | None:
        from engine.lora.planning import cap_problem

        return cap_problem(self.spec(model_type), stack)

    def merge_stack(self, model: str, stack: Stack, name: str, *, dtype: str | None = None,
                    on_progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
        """Bake `stack` into a new model `models_dir/name`: a folder for a diffusers model, a recipe
        `name.json` with its expert files beside it for a single-file model (streamed; engine/lora/bake.py).

        Returns the merge summary with the per-entry LoRA report; `on_progress(done, total, tensor)`.
        """
        from engine.lora.bake import merge_model

        info = self.find_model(model)
        clean = (name or "").strip() if isinstance(name, str) else ""
        if (not clean or clean in (".", "..") or "/" in clean or "\\" in clean or clean.startswith(".")
                or len(clean) > 100 or any(ord(c) < 32 or ord(c) == 127 for c in clean)):
            raise RequestError(f"new model name {str(name)[:100]!r} must be a plain folder name of at most 100 "
                               "characters (letters, digits, '-', '_'), e.g. my-model-merged")
        taken = {m.id for m in self.model_infos(refresh=True)}
        folder = self.settings.models_dir / clean
        if clean in taken or folder.exists() or folder.with_name(f"{clean}.json").exists():
            raise RequestError(f"new model name {clean!r} already exists (it is already a model here); pick another "
                               "name so it does not shadow the existing one")
        self._check_files(self.spec(info.type), stack)
        # a diffusers folder becomes a new folder; single files (recipe, --comfyui) a new recipe beside its files
        out = folder if info.source == "diffusers" else folder.with_name(f"{clean}.json")
        report = merge_model(info, stack, out, dtype=dtype,
                             lora_caps=self.settings.lora_caps, resolve=self.library.path_of, progress=on_progress)
        self.model_infos(refresh=True)  # the new model is listed from now on
        return report

    def _check_files(self, spec: ModelSpec, stack: Stack) -> list[str]:
        """Every entry names a file in the LoRA folder that fits the model; the cap holds. Returns warnings."""
        from engine.lora.planning import check_stack

        listed = {v.file: v for v in self.loras(spec.type)}
        for i, entry in enumerate(stack.entries):
            view = listed.get(entry.file)  # only names the server listed: no paths outside the folder
            if view is None:
                raise RequestError(f"unknown LoRA {entry.file!r} (row {i + 1}): not in the LoRA folder "
                                   f"{self.settings.loras_dir}; copy it back, pick another file or remove the row")
            if not view.ok:
                raise RequestError(f"LoRA {entry.file} (row {i + 1}) cannot be read: {view.reason}")
            if not view.compatible:
                raise RequestError(f"LoRA {entry.file} does not fit {spec.type}: {view.reason}")
        return check_stack(spec, stack)

    # ---- presets ---------------------------------------------------------------------------
    @property
    def preset_store(self):
        if self._presets is None:
            from engine.presets import PresetStore

            self._presets = PresetStore(self.settings.presets_dir)
        return self._presets

    def presets(self) -> list[PresetView]:
        out = []
        for s in self.preset_store.list():
            out.append(self.preset(s.name))
        return out

    def preset(self, name: str) -> PresetView:
        p = self.preset_store.load(name)
        return PresetView(p.name, p.model_type, tuple(dict(e) for e in p.entries), p.notes, p.updated,
                          dict(p.settings))

    def load_preset(self, name: str, current_model: str | None) -> PresetLoad:
        """The preset as editor rows for the model it was saved for: the current model when its type matches,
        else the first listed model of that type (the UI switches to it), else None with a note."""
        from engine.presets import mark_entries

        preset = self.preset(self._known_preset(name))
        model = None
        if current_model:
            try:
                current = self.model(current_model)
                model = current if current.type == preset.model_type else None
            except RequestError:
                model = None
        if model is None:
            model = next((m for m in self.models() if m.ok and m.type == preset.model_type), None)
        notes = []
        if model is None:
            notes.append(f"preset {preset.name!r} needs a {preset.model_type} model, and none is in the models "
                         "folder; add one and rescan")
            return PresetLoad(preset, (), tuple(notes), None)
        available = {v.file: v.sha256 for v in self.loras(preset.model_type)}
        rows = mark_entries(list(preset.entries), available)
        for r in rows:
            if r["status"] != "ok":
                notes.append(r["problem"])
            r.setdefault("applies_to", "both")
            r.setdefault("enabled", True)
            r.setdefault("low_noise_weight", None)
        return PresetLoad(preset, tuple(rows), tuple(notes), model)

    def save_preset(self, name: str, model_type: str, stack: Stack, notes: str | None = None,
                    settings: dict[str, Any] | None = None) -> PresetView:
        """Save `stack` under `name`. `notes` and `settings` (a speed preset's steps / guidance / guidance_2 /
        shift) left as None keep those of the preset being overwritten; `settings={}` clears them."""
        from engine.presets import Preset

        hashes = {v.file: v.sha256 for v in self.loras(model_type)}
        entries = []
        for e in stack.entries:
            d = e.to_dict()
            if hashes.get(e.file):
                d["sha256"] = hashes[e.file]
            entries.append(d)
        store = self.preset_store
        old = store.load(name) if name and store.exists(name) else None
        store.save(Preset(name or "", model_type, entries, notes if notes is not None else (old.notes if old else ""),
                          settings=dict(settings) if settings is not None else (dict(old.settings) if old else {})))
        return self.preset(name)

    def rename_preset(self, name: str, new_name: str) -> PresetView:
        p = self.preset_store.rename(self._known_preset(name), new_name or "")
        return self.preset(p.name)

    def duplicate_preset(self, name: str, new_name: str | None = None) -> PresetView:
        p = self.preset_store.duplicate(self._known_preset(name), (new_name or "").strip() or None)
        return self.preset(p.name)

    def delete_preset(self, name: str) -> None:
        self.preset_store.delete(self._known_preset(name))

    def export_preset(self, name: str) -> Path:
        return self.preset_store.export_path(self._known_preset(name))

    def import_preset(self, raw: bytes, filename: str, model_type: str | None) -> PresetView:
        from engine.presets import MAX_PRESET_BYTES, PresetError

        if len(raw) > MAX_PRESET_BYTES:
            raise PresetError(f"{filename} is {len(raw)} bytes; a preset is under {MAX_PRESET_BYTES}")
        files = [v.file for v in self.loras(model_type)] if model_type else []
        p = self.preset_store.import_bytes(raw, filename, model_type, files)
        return self.preset(p.name)

    def _known_preset(self, name: str) -> str:
        """Names come from clients: act only on presets the store itself lists."""
        from engine.presets import PresetError

        names = self.preset_store.names()
        if not name or name not in names:
            raise PresetError(f"preset {name!r} not found; saved presets: {', '.join(names) or 'none yet'}")
        return name

    # ---- memory ----------------------------------------------------------------------------
    def vram(self) -> MemoryView:
        """GPU and RAM now (`reason` says why VRAM figures are missing)."""
        from engine import memory

        snap = memory.snapshot()
        gpu = snap.gpus[0] if snap.gpus else None
        ram_used = (snap.ram_total_bytes - snap.ram_available_bytes
                    if snap.ram_total_bytes is not None and snap.ram_available_bytes is not None else None)
        return MemoryView(
            vram_used_bytes=gpu.used_bytes if gpu else None, vram_total_bytes=gpu.total_bytes if gpu else None,
            ram_used_bytes=ram_used, ram_total_bytes=snap.ram_total_bytes,
            reason="" if snap.available else str(snap.reason or "no NVIDIA GPU"))

    # ---- generation ---------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> ValidatedRequest:
        """The one check at the door: the model is listed and usable, every setting in range (defaults
        filled in, a random seed drawn), every LoRA in the folder and fitting the model, the cap held."""
        from engine.run.request import check_model_limits, resolve_request

        info = self.find_model(request.model)
        spec = self.spec(info.type)
        resolved = resolve_request(request, spec)
        check_model_limits(resolved, spec, _transformer_config(info.path))
        if not self.settings.allow_lora_paths_outside:
            warnings = self._check_files(spec, request.stack)
        else:
            from engine.lora.planning import check_stack

            warnings = check_stack(spec, request.stack)
        return ValidatedRequest(request, info, spec, resolved, tuple(warnings))

    def generate(self, request: ValidatedRequest | GenerationRequest, on_event: EventCallback | None = None, *,
                 out_path: str | Path | None = None, stream_video: bool = False) -> GenerationResult:
        """Run one generation; events end with Done or Failed. `stream_video` also emits VideoChunk events
        while the VAE decodes. Raises what Failed reports."""
        from engine.run.generate import Generator

        emit = on_event or (lambda event: None)
        try:
            checked = request if isinstance(request, ValidatedRequest) else self.validate(request)
            with self._lock:
                if self._generator is None:
                    self._generator = Generator(self.settings, self.library)
                result = self._generator.run(checked, emit, out_path=out_path, stream_video=stream_video)
        except GenerationCancelled as e:
            emit(Failed(str(e) or "stopped", cancelled=True))
            raise
        except WanStackError as e:
            emit(Failed(str(e)))
            raise
        except Exception as e:
            log.exception("generation failed")
            emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            raise
        emit(Done(result))
        return result

    def cancel(self) -> None:
        """Stop the running generation at the next step boundary."""
        if self._generator is not None:
            self._generator.cancel()

    def release(self) -> None:
        """Drop the cached pipeline (and its LoRA merge state) and free its memory."""
        if self._generator is not None:
            self._generator.release()

    def streaming_problem(self) -> str | None:
        """Why the page cannot stream the video while it decodes (ffmpeg/ffprobe missing), or None."""
        from engine.run.video import streaming_unavailable

        return streaming_unavailable()

    # ---- outputs ---------------------------------------------------------------------------
    def outputs(self, limit: int = 60) -> list[OutputView]:
        """Past runs in the outputs folder, newest first: videos with thumbnails, failed and stopped runs."""
        from engine.run.outputs import list_outputs

        return list_outputs(self.settings.outputs_dir, limit)

    def outputs_version(self) -> str | None:
        """Changes when a run is added to or removed from the outputs folder (None: it just changed, ask
        again); one stat, for pages that re-list only when it changed."""
        from engine.run.outputs import outputs_version

        return outputs_version(self.settings.outputs_dir)


def _transformer_config(model_path) -> dict | None:
    """The transformer's config.json of a diffusers folder (None for other layouts or when unreadable)."""
    import json

    path = Path(model_path) / "transformer" / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
