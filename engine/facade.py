"""The one object the UI (and app.py) talks to: models, LoRAs, presets, memory and generation.

Everything crossing this boundary is a plain dataclass, dict or callback, so `ui/` never needs torch.
Heavy imports happen inside methods.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.catalog import ModelSpec, get_spec, with_lora_cap
from engine.types import GenerationRequest, GenerationResult, RequestError

log = logging.getLogger(__name__)

# on_event(kind, payload). Kinds, in order of a run:
#   "status"  str        a line for the user ("loading model", "applying 2 LoRAs", ...)
#   "loras"   list[dict] per-entry apply report (file, status, coverage, experts, warnings)
#   "plan"    dict       memory plan (mode, vae_tiling, fits, estimate_bytes, reasons)
#   "step"    StepInfo   one denoising step, with a preview image
#   "memory"  dict       gauge sample (vram_used_bytes, ram_used_bytes, peaks) about twice a second
#   "retry"   str        "retried with group offload after out-of-memory"
#   "video_chunk" str    path of a finished MP4 segment while the VAE decodes (for streaming players)
EventCallback = Callable[[str, Any], None]


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
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self._lock = threading.Lock()  # one generation at a time
        self._generator = None
        self._loras = None

    # ---- models -------------------------------------------------------------------------
    def list_models(self):
        """Detected models (engine.detect.ModelInfo) in models_dir and the data folder's demo models."""
        from engine.detect import scan

        found = scan(self.settings.models_dir, self.settings.comfyui_dir)
        demo_root = self.settings.data_dir / "demo-models"
        if demo_root.is_dir():
            found += scan(demo_root)
        return found

    DEMO_ARCHS = ("wan2.2-t2v-a14b", "wan2.1-t2v-1.3b")

    def ensure_demo_model(self) -> list:
        """Build the demo models (and their demo LoRAs) into the data folder when models/ holds no
        usable real model. Returns the demo ModelInfos built or found; [] when a real model exists."""
        from engine.demo import build_demo_model
        from engine.detect import detect

        if any(m.ok and not m.demo for m in self.list_models()):
            return []
        infos = []
        for arch in self.DEMO_ARCHS:
            out = self.settings.data_dir / "demo-models" / f"demo-{arch}"
            if not (out / "model_index.json").exists():
                log.info("building the demo model %s (random weights) in %s", arch, out)
                build_demo_model(out, arch, loras_dir=self.settings.loras_dir)
            infos.append(detect(out))
        return infos

    def find_model(self, model: str):
        """Resolve a model id (folder name as listed) or a path the server itself listed."""
        for info in self.list_models():
            if model in (info.id, info.path):
                if not info.ok:
                    raise RequestError(f"model {info.id} cannot be used: {info.reason}")
                return info
        names = ", ".join(m.id for m in self.list_models() if m.ok) or "none"
        raise RequestError(f"model {model!r} not found; available: {names}")

    def spec(self, model_type: str) -> ModelSpec:
        return with_lora_cap(get_spec(model_type), self.settings.lora_caps)

    # ---- LoRAs -----------------------------------------------------------------------------
    @property
    def loras(self):
        """The one LoraManager (parsed-file cache by sha256, merge state) shared with the generator."""
        if self._loras is None:
            from engine.lora import LoraManager

            extra = {}
            if self.settings.comfyui_dir is not None and (Path(self.settings.comfyui_dir) / "loras").is_dir():
                extra["comfyui"] = Path(self.settings.comfyui_dir) / "loras"  # --comfyui: its loras/ joins ours
            self._loras = LoraManager(self.settings.loras_dir, extra_dirs=extra)
        return self._loras

    def list_loras(self, model_type: str | None = None) -> list[dict]:
        """LoRA files in loras_dir (relative paths) with their inspection, and whether they fit the model type."""
        return self.loras.list_loras(self.spec(model_type) if model_type else None)

    def inspect_lora(self, file: str, model: str | None = None) -> dict:
        """Full inspection of one file in loras_dir; with a model id, coverage against that model."""
        path = self.loras.path_of(file)
        if not path.is_file():
            raise RequestError(f"LoRA {file} is not in {self.settings.loras_dir}; press refresh or pick another")
        return self.loras.inspect(path, self.find_model(model).path if model else None)

    def merge_stack(self, model: str, stack, name: str, *, dtype: str | None = None,
                    on_progress: Callable[[int, int, str], None] | None = None) -> dict:
        """Bake `stack` into a new model folder `models_dir/name` (streamed; engine/lora/bake.py).

        Returns the merge summary with the per-entry LoRA report; `on_progress(done, total, tensor)`.
        """
        from engine.lora.bake import merge_model

        info = self.find_model(model)
        clean = (name or "").strip() if isinstance(name, str) else ""
        if (not clean or clean in (".", "..") or "/" in clean or "\\" in clean or clean.startswith(".")
                or len(clean) > 100 or any(ord(c) < 32 or ord(c) == 127 for c in clean)):
            raise RequestError(f"new model name {str(name)[:100]!r} must be a plain folder name of at most 100 "
                               "characters (letters, digits, '-', '_'), e.g. my-model-merged")
        taken = {m.id for m in self.list_models()}
        if clean in taken or (self.settings.models_dir / clean).exists():
            raise RequestError(f"new model name {clean!r} is already a model here; pick another name so it does "
                               "not shadow the existing one")
        return merge_model(info.path, stack, self.settings.models_dir / clean, dtype=dtype,
                           lora_caps=self.settings.lora_caps, resolve=self.loras.path_of, progress=on_progress)

    def check_stack(self, model_type: str, stack) -> list[str]:
        """Caps and routing before any load: raises LoraCapExceeded; returns warnings."""
        for entry in stack.entries:
            if not self.loras.path_of(entry.file).is_file():
                raise RequestError(f"LoRA {entry.file} is not in {self.settings.loras_dir}; press refresh or remove the row")
        return self.loras.check(self.spec(model_type), stack)

    # ---- memory ----------------------------------------------------------------------------
    def vram(self) -> dict:
        """GPU and RAM snapshot now (`available: false` with the reason when there is no usable GPU)."""
        from engine import memory

        return memory.snapshot().to_dict()

    def plan(self, request: GenerationRequest) -> dict:
        """The memory plan this request would get now: mode, VAE tiling, estimate and reasons."""
        from engine import memory
        from engine.request import resolve_request

        info = self.find_model(request.model)
        spec = self.spec(info.type)
        r = resolve_request(request, spec)
        snap = memory.snapshot()
        n_loras = max((len(request.stack.enabled_for(e)) for e in spec.experts), default=0)
        plan = memory.plan_for(spec, r.height, r.width, r.frames, loras=n_loras, snapshot=snap, choice=request.offload,
                               reserve_bytes=request.vram_reserve_bytes or self.settings.vram_reserve_bytes,
                               dtype=None if snap.free_vram_bytes() is not None else "fp32")
        out = plan.to_dict()
        if n_loras:
            out["lora_transient"] = memory.check_stack_transient(plan.workload, plan, snap).message
        return out

    # ---- generation ---------------------------------------------------------------------
    def generate(self, request: GenerationRequest, on_event: EventCallback | None = None, *,
                 out_path: str | Path | None = None, stream_video: bool = False) -> GenerationResult:
        """Run one generation. `stream_video` also emits "video_chunk" events while the VAE decodes."""
        from engine.generate import Generator

        info = self.find_model(request.model)
        with self._lock:
            if self._generator is None:
                self._generator = Generator(self.settings, self.loras)
            return self._generator.run(info, self.spec(info.type), request, on_event or (lambda kind, payload: None),
                                       out_path=out_path, stream_video=stream_video)

    def cancel(self) -> None:
        """Stop the running generation at the next step boundary."""
        if self._generator is not None:
            self._generator.cancel()

    def release(self) -> None:
        """Drop the cached pipeline and free its memory."""
        if self._generator is not None:
            self._generator.release()
