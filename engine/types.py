"""Plain, torch-free request and result types shared by the engine, the CLI and the UI."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

APPLIES_TO = ("both", "high_noise", "low_noise")
WEIGHT_LIMIT = 10.0


class OffloadMode(str, Enum):
    """The offload modes, lightest first: the one list (the policy escalates along it after an OOM)."""

    NONE = "none"
    MODEL = "model"
    GROUP = "group"
    SEQUENTIAL = "sequential"

    @property
    def label(self) -> str:
        return {"none": "no offload", "model": "model offload", "group": "group offload",
                "sequential": "sequential offload"}[self.value]

    def heavier(self) -> "OffloadMode | None":
        order = list(OffloadMode)
        i = order.index(self)
        return order[i + 1] if i + 1 < len(order) else None


OFFLOAD_MODES = tuple(m.value for m in OffloadMode)
OFFLOAD_CHOICES = ("auto",) + OFFLOAD_MODES  # what a user may ask for: a mode, or auto (the policy picks)


class WanStackError(Exception):
    """Base of every error that carries a message meant for the user."""


class RequestError(WanStackError, ValueError):
    """A request field is out of range; the message names the field, the value and the fix."""


class GenerationCancelled(WanStackError):
    """The user stopped a generation between two steps."""


Weight = Union[float, tuple[float, ...]]  # a number, or a schedule: values spread evenly over the steps


@dataclass(frozen=True)
class LoraEntry:
    """One row of a stack. `file` is relative to the LoRA folder (or an absolute path on the CLI).

    `weight` and `low_noise_weight` are a number or a schedule (a tuple of numbers; JSON lists are
    accepted and a one-value list is that number). A schedule covers the steps the entry acts on,
    cut into as many equal consecutive runs as it has values (DESIGN.md, "Weight schedules").
    """

    file: str
    weight: Weight = 1.0
    applies_to: str = "both"
    low_noise_weight: Weight | None = None
    enabled: bool = True
    sha256: str | None = None

    def __post_init__(self):
        if not self.file or not isinstance(self.file, str):
            raise RequestError("LoRA entry has no file; pick a LoRA file for every row")
        _check_entry_types(self)
        if self.applies_to not in APPLIES_TO:
            raise RequestError(
                f"applies_to {self.applies_to!r} for {self.file} is not one of {', '.join(APPLIES_TO)}"
            )
        for name in ("weight", "low_noise_weight"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (list, tuple)):
                if not value:
                    raise RequestError(f"{name} for {self.file} is an empty schedule; give a number or a list of numbers")
                for v in value:
                    _check_weight_value(name, v, self.file, value)
                value = float(value[0]) if len(value) == 1 else tuple(float(v) for v in value)
                object.__setattr__(self, name, value)
            else:
                _check_weight_value(name, value, self.file, value)

    def schedule_for(self, expert: str) -> Weight:
        """The number or schedule acting on one expert ('high_noise', 'low_noise' or 'single'); 0 where it does not act."""
        if not self.enabled:
            return 0.0
        if expert == "single":
            return self.weight
        if self.applies_to not in ("both", expert):
            return 0.0
        if expert == "low_noise" and self.low_noise_weight is not None:
            return self.low_noise_weight
        return self.weight

    def weight_for(self, expert: str) -> float:
        """The strength on one expert; for a schedule its first value (see schedule_for for the whole list)."""
        w = self.schedule_for(expert)
        return float(w[0]) if isinstance(w, tuple) else float(w)

    @property
    def scheduled(self) -> bool:
        """True when `weight` or `low_noise_weight` changes over the steps (a list with different values)."""
        return any(isinstance(w, tuple) and len(set(w)) > 1 for w in (self.weight, self.low_noise_weight))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraEntry":
        if not isinstance(d, dict):
            raise RequestError(f"a stack entry must be an object with 'file' and 'weight', got {d!r}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise RequestError(f"unknown stack entry field(s) {sorted(unknown)}; allowed: file, weight, applies_to, low_noise_weight, enabled, sha256")
        try:
            return cls(**d)
        except TypeError as e:
            raise RequestError(f"bad stack entry {d!r}: {e}") from None


def format_weight(weight: Any) -> str:
    """`0.8` or `1:0.8:0.5`: how CLI specs and the UI's schedule field spell a weight."""
    if isinstance(weight, (list, tuple)):
        return ":".join(f"{float(v):g}" for v in weight)
    return f"{float(weight):g}"


def parse_weight(text: str, field: str = "weight") -> Weight:
    """`0.8` -> 0.8; `1.0:0.8:0.5` -> (1.0, 0.8, 0.5). Raises ValueError naming the bad part."""
    parts = [p.strip() for p in str(text).strip().split(":")]
    vals = []
    for part in parts:
        try:
            vals.append(float(part))
        except ValueError:
            raise ValueError(
                f"{field} {text!r}: {part!r} is not a number; write a number or numbers joined by ':' "
                "(e.g. 1.0:0.8:0.5)") from None
    return vals[0] if len(vals) == 1 else tuple(vals)


def _check_weight_value(name: str, v: Any, file: str, whole: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) > WEIGHT_LIMIT:
        shown = f"{v}" if whole is v else f"{v} (in {list(whole)})"
        raise RequestError(
            f"{name} {shown} for {file} must be a number between -{WEIGHT_LIMIT:g} and {WEIGHT_LIMIT:g}"
            + ("" if whole is v else ", or a list of such numbers")
        )


@dataclass(frozen=True)
class Stack:
    """An ordered list of LoRA entries for one model type."""

    entries: tuple[LoraEntry, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "entries", tuple(self.entries))

    def enabled_for(self, expert: str) -> list[LoraEntry]:
        """Enabled entries that act on `expert` (what the per-expert cap counts)."""
        return [e for e in self.entries if e.enabled and _acts_on(e, expert)]

    def fingerprint(self, hashes: dict[str, str] | None = None) -> str:
        """Hash of (file sha256, weights, applies_to, enabled): an unchanged stack is never re-applied."""
        hashes = hashes or {}
        rows = [
            [hashes.get(e.file) or e.sha256 or e.file, e.weight, e.applies_to, e.low_noise_weight, e.enabled]
            for e in self.entries
        ]
        return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]

    def to_list(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.entries]

    @classmethod
    def from_list(cls, rows: list[dict[str, Any]] | None) -> "Stack":
        if rows is None:
            return cls()
        if not isinstance(rows, list):
            raise RequestError("stack must be a JSON list of entries like [{\"file\": \"x.safetensors\", \"weight\": 1.0}]")
        if len(rows) > MAX_STACK_ENTRIES:
            raise RequestError(f"stack has {len(rows)} entries; at most {MAX_STACK_ENTRIES} are accepted")
        return cls(tuple(LoraEntry.from_dict(r) for r in rows))


MAX_FILE_CHARS = 1024
MAX_STACK_ENTRIES = 64


def _check_entry_types(entry: "LoraEntry") -> None:
    """Types a JSON stack can get wrong (`"enabled": "no"`, `"weight": null`), each refused in one line."""
    name = entry.file[:80]
    if len(entry.file) > MAX_FILE_CHARS or "\0" in entry.file:
        raise RequestError(f"LoRA file name {name!r}... is not a file name (over {MAX_FILE_CHARS} characters or a NUL)")
    if not isinstance(entry.enabled, bool):
        raise RequestError(f"enabled {entry.enabled!r} for {name} must be true or false")
    if entry.weight is None or isinstance(entry.weight, bool):
        raise RequestError(f"weight {entry.weight!r} for {name} must be a number between -{WEIGHT_LIMIT:g} and {WEIGHT_LIMIT:g}")
    if isinstance(entry.low_noise_weight, bool):
        raise RequestError(f"low_noise_weight {entry.low_noise_weight!r} for {name} must be a number or null")
    if not isinstance(entry.applies_to, str):
        raise RequestError(f"applies_to {entry.applies_to!r} for {name} is not one of {', '.join(APPLIES_TO)}")
    if entry.sha256 is not None and not (isinstance(entry.sha256, str) and len(entry.sha256) <= 64):
        raise RequestError(f"sha256 {str(entry.sha256)[:80]!r} for {name} must be a 64-character hex digest or null")


def _acts_on(entry: LoraEntry, expert: str) -> bool:
    return expert == "single" or entry.applies_to in ("both", expert)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation needs. Validated against the model's catalog spec at the engine's door."""

    model: str
    prompt: str
    negative_prompt: str = ""
    image: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    fps: int | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_2: float | None = None
    seed: int | None = None
    shift: float | None = None
    stack: Stack = field(default_factory=Stack)
    offload: str = "auto"
    skip_failing_loras: bool = False
    vram_reserve_bytes: int = 0
    ignore_memory_plan: bool = False  # run even when the memory plan says it cannot fit (refused otherwise)
    speed: "SpeedOptions | None" = None  # engine.speed.options (attention, compile, step cache); None: defaults


@dataclass
class GenerationResult:
    path: str
    seed: int
    frames: int
    width: int
    height: int
    fps: int
    seconds: float
    offload: str
    loras: list[dict[str, Any]] = field(default_factory=list)
    model_type: str = ""
    steps: int = 0
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    peak_vram_bytes: int | None = None
    peak_ram_bytes: int | None = None
    speed: dict[str, Any] = field(default_factory=dict)  # attention backend, compile, step cache computed/skipped

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
