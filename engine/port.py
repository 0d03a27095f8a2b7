"""The engine's one typed door: the `EnginePort` protocol, the events of a run and the views it returns.

Everything here is a frozen dataclass of plain values (no torch, no PIL): `ui/` imports this module,
`engine.types` and `engine.facade`, and nothing else of the engine. Previews cross as encoded GIF bytes,
videos as file paths. The real facade (`engine.facade.Engine`) and the test fakes both implement
`EnginePort`; nothing probes an engine for what it can do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Union, runtime_checkable

from engine.models.catalog import ModelSpec  # the door's model-type record: a frozen, torch-free dataclass
from engine.speed.options import ATTENTION_CHOICES, CACHE_CHOICES, MIN_CACHE_STEPS, SpeedOptions  # torch-free
from engine.types import GenerationRequest, GenerationResult, Stack

if TYPE_CHECKING:  # pragma: no cover
    from engine.models.detect import ModelInfo
    from engine.run.request import Resolved

__all__ = [
    "Done", "EnginePort", "Event", "EventCallback", "Failed", "Memory", "MemoryView", "ModelSpec", "ModelView",
    "LoraView", "OutputView", "Plan", "PlanView", "PresetLoad", "PresetView", "Retry", "StackApplied",
    "StackEntryReport", "StackReport", "Status", "Step", "ValidatedRequest", "VideoChunk", "CoverageCount",
    "EXPERT_NAMES", "SpeedOptions", "ATTENTION_CHOICES", "CACHE_CHOICES", "MIN_CACHE_STEPS",
]

EXPERT_NAMES = {"high_noise": "high-noise", "low_noise": "low-noise", "single": "model"}


# ---- views ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelView:
    """One detected model. `spec` (with the server's LoRA caps) is None when the model is unusable."""

    id: str
    type: str | None
    ok: bool
    reason: str = ""
    demo: bool = False
    label: str = ""
    spec: ModelSpec | None = None
    source: str = "diffusers"  # diffusers | recipe | comfyui
    storage_label: str = ""  # "fp8 scaled · 2 experts", "GGUF Q4_K · 2 experts", "bf16" (issue 10)
    storage: str = ""  # the experts' storage: fp32, bf16, fp16, fp8_e4m3fn, fp8_scaled, gguf-Q4_K, ...
    files: dict = field(default_factory=dict)  # component -> the file (or folder) name it is loaded from

    @property
    def display(self) -> str:
        text = f"{self.id} · {'random weights' if self.demo else self.type}"
        return f"{text} · {self.storage_label}" if self.storage_label and self.source != "diffusers" else text


@dataclass(frozen=True)
class LoraView:
    """One LoRA file in the LoRA folder, inspected from its header, and whether it fits a model type."""

    file: str  # relative to the LoRA folder
    ok: bool = True
    compatible: bool = True
    reason: str = ""
    sha256: str | None = None
    size_bytes: int | None = None
    apply_memory_bytes: int | None = None
    rank: int | None = None
    alpha: float | None = None
    family: str = ""
    format: str = ""
    trigger_words: tuple[str, ...] = ()
    two_expert: bool = False
    # 'high_noise' / 'low_noise' from the file's name or metadata; None for a one-expert or two-expert file
    expert: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "LoraView":
        hint = row.get("expert_hint")
        return cls(
            file=row["file"], ok=bool(row.get("ok", True)), compatible=bool(row.get("compatible", True)),
            reason=str(row.get("reason") or ""), sha256=row.get("sha256"), size_bytes=row.get("size_bytes"),
            apply_memory_bytes=row.get("apply_memory_bytes"), rank=row.get("rank"), alpha=row.get("alpha"),
            family=str(row.get("family") or ""), format=str(row.get("format") or ""),
            trigger_words=tuple(row.get("trigger_words") or ()), two_expert=bool(row.get("two_expert")),
            expert=hint if hint in ("high_noise", "low_noise") else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class CoverageCount:
    """How many of a file's keys applied, and how many were skipped or matched nothing."""

    applied: int = 0
    total: int = 0
    skipped: int = 0
    unmatched: int = 0
    shape_mismatch: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "CoverageCount":
        d = d or {}
        n = (lambda v: len(v) if isinstance(v, (list, tuple, dict)) else int(v or 0))  # noqa: E731
        return cls(n(d.get("applied")), int(d.get("total") or 0), n(d.get("skipped")), n(d.get("unmatched")),
                   n(d.get("shape_mismatch")))

    def text(self, verb: str = "applied") -> str:
        total = self.total or self.applied + self.skipped + self.unmatched + self.shape_mismatch
        text = f"{self.applied}/{total} keys {verb}"
        other = self.skipped + self.shape_mismatch
        if other or self.unmatched:
            text += f" ({other} skipped, {self.unmatched} unmatched)"
        return text


@dataclass(frozen=True)
class StackEntryReport:
    """What one stack entry did, in total and per expert."""

    file: str
    status: str  # applied | skipped | disabled | failed
    reason: str = ""
    sha256: str | None = None
    mode: str = "merged"
    weights: dict[str, Any] = field(default_factory=dict)  # expert -> strength, or a list for a schedule
    coverage: CoverageCount = CoverageCount()
    by_expert: dict[str, CoverageCount] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    mode_note: str = ""  # runtime entries (weight schedules): their per-step cost in words

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "StackEntryReport":
        return cls(file=row.get("file", ""), status=row.get("status", "?"), reason=row.get("reason") or "",
                   sha256=row.get("sha256"), mode=row.get("mode") or "merged", weights=dict(row.get("weights") or {}),
                   coverage=CoverageCount.from_dict(row.get("coverage")),
                   by_expert={e: CoverageCount.from_dict(c) for e, c in (row.get("coverage_by_expert") or {}).items()},
                   warnings=tuple(row.get("warnings") or ()), mode_note=row.get("mode_note") or "")


@dataclass(frozen=True)
class StackReport:
    """The applied stack: one report per entry, and per expert the entries acting on it."""

    entries: tuple[StackEntryReport, ...] = ()
    experts: tuple[str, ...] = ()

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], experts: tuple[str, ...]) -> "StackReport":
        return cls(tuple(StackEntryReport.from_row(r) for r in rows), tuple(experts))

    def on_expert(self, expert: str) -> list[StackEntryReport]:
        """Applied entries acting on `expert` (non-zero weight)."""
        return [e for e in self.entries if e.status == "applied" and e.weights.get(expert, 0.0) != 0.0]

    def by_file(self) -> dict[str, StackEntryReport]:
        return {e.file: e for e in self.entries}


@dataclass(frozen=True)
class PlanView:
    """The memory plan of a run: offload mode, VAE tiling, whether it fits, the estimate and why."""

    mode: str
    vae_tiling: bool = False
    fits: bool = True
    label: str = ""
    peak_bytes: int | None = None
    estimate_bytes: dict[str, int] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    device: str = "cpu"
    speed: dict[str, Any] = field(default_factory=dict)  # attention backend, compile, step cache (engine/speed)

    @classmethod
    def from_plan(cls, plan, speed: dict[str, Any] | None = None) -> "PlanView":
        """From an engine.memory.OffloadPlan (and the run's speed plan)."""
        est = {k: v for k, v in dict(plan.estimate_bytes).items() if isinstance(v, int)}
        return cls(mode=plan.mode.value, vae_tiling=plan.vae_tiling, fits=plan.fits, label=plan.label,
                   peak_bytes=est.get("peak"), estimate_bytes=est, reasons=tuple(plan.reasons), device=plan.device,
                   speed=dict(speed or {}))


@dataclass(frozen=True)
class MemoryView:
    """A VRAM/RAM sample (during a run: with the run's peaks). `reason` says why VRAM figures are missing."""

    vram_used_bytes: int | None = None
    vram_total_bytes: int | None = None
    ram_used_bytes: int | None = None
    ram_total_bytes: int | None = None
    peak_vram_bytes: int | None = None
    peak_ram_bytes: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class PresetView:
    """A saved named stack."""

    name: str
    model_type: str
    entries: tuple[dict[str, Any], ...] = ()
    notes: str = ""
    updated: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # speed presets: steps, guidance, guidance_2, shift


@dataclass(frozen=True)
class PresetLoad:
    """A preset made ready for the editor: its rows (missing/changed files marked), notes for the user,
    and the model it needs: `model` is the model to switch to (None when no listed model has its type)."""

    preset: PresetView
    rows: tuple[dict[str, Any], ...]
    notes: tuple[str, ...]
    model: ModelView | None


@dataclass(frozen=True)
class OutputView:
    """One past run in the outputs folder: the MP4 (None for a failed/stopped run), a thumbnail, its settings."""

    id: str  # file stem
    status: str  # done | failed | stopped
    video: str | None
    thumbnail: str | None  # a PNG of the first frame
    created: str
    caption: str
    message: str = ""
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidatedRequest:
    """A request checked at the door once: its model, spec, every setting resolved, the stack checked.
    The generator runs this and looks nothing up again."""

    request: GenerationRequest
    model: "ModelInfo"
    spec: ModelSpec
    resolved: "Resolved"
    warnings: tuple[str, ...] = ()

    @property
    def stack(self) -> Stack:
        return self.request.stack

    @property
    def loras_per_expert(self) -> int:
        return max((len(self.request.stack.enabled_for(e)) for e in self.spec.experts), default=0)


# ---- events of a run ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Status:
    text: str  # "loading demo-…", "applying 2 LoRA(s)", "denoising", "decoding"


@dataclass(frozen=True)
class StackApplied:
    report: StackReport


@dataclass(frozen=True)
class Plan:
    plan: PlanView


@dataclass(frozen=True)
class Step:
    step: int  # 1-based
    total: int
    seconds: float
    expert: str  # high_noise | low_noise | single
    preview_gif: bytes | None = None  # a small looping GIF of the latents, one frame per latent frame


@dataclass(frozen=True)
class Memory:
    sample: MemoryView


@dataclass(frozen=True)
class Retry:
    message: str  # "retried with group offload after out-of-memory"


@dataclass(frozen=True)
class VideoChunk:
    path: str  # a finished MPEG-TS segment while the VAE decodes


@dataclass(frozen=True)
class Done:
    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    message: str
    cancelled: bool = False  # stopped by the user rather than an error


Event = Union[Status, StackApplied, Plan, Step, Memory, Retry, VideoChunk, Done, Failed]
EventCallback = Callable[[Event], None]


# ---- the door -------------------------------------------------------------------------------------

@runtime_checkable
class EnginePort(Protocol):
    """What the UI (and app.py) may ask of the engine. Errors meant for the user are WanStackError."""

    # models
    def models(self, refresh: bool = False) -> list[ModelView]: ...
    def model(self, model_id: str) -> ModelView: ...

    # LoRAs
    def loras(self, model_type: str | None, refresh: bool = False) -> list[LoraView]: ...
    def inspect_lora(self, file: str, model: str | None = None) -> dict[str, Any]: ...
    def cap_problem(self, model_type: str, stack: Stack) -> str | None: ...
    def merge_stack(self, model: str, stack: Stack, name: str, *, dtype: str | None = None,
                    on_progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]: ...

    # presets
    def presets(self) -> list[PresetView]: ...
    def load_preset(self, name: str, current_model: str | None) -> PresetLoad: ...
    def save_preset(self, name: str, model_type: str, stack: Stack, notes: str | None = None,
                    settings: dict[str, Any] | None = None) -> PresetView: ...
    def rename_preset(self, name: str, new_name: str) -> PresetView: ...
    def duplicate_preset(self, name: str, new_name: str | None = None) -> PresetView: ...
    def delete_preset(self, name: str) -> None: ...
    def export_preset(self, name: str) -> Path: ...
    def import_preset(self, raw: bytes, filename: str, model_type: str | None) -> PresetView: ...

    # runs
    def validate(self, request: GenerationRequest) -> ValidatedRequest: ...
    def generate(self, request: ValidatedRequest | GenerationRequest, on_event: EventCallback | None = None, *,
                 out_path: str | Path | None = None, stream_video: bool = False) -> GenerationResult: ...
    def cancel(self) -> None: ...
    def release(self) -> None: ...
    def outputs(self, limit: int = 60) -> list[OutputView]: ...
    def outputs_version(self) -> str | None: ...
    def vram(self) -> MemoryView: ...
    def streaming_problem(self) -> str | None: ...

    # settings the page shows
    @property
    def offload(self) -> str: ...
    @property
    def loras_dir(self) -> str: ...
