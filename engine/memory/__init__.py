"""Memory governor: NVML snapshots, a live watch, the VRAM estimator, the offload policy and OOM recovery.

Importing this package loads neither torch nor pynvml; `engine.memory.offload` (apply_plan /
undo_plan) imports diffusers when called.
"""
from __future__ import annotations

from typing import Any

from engine.models.catalog import ModelSpec
from engine.memory.caps import TransientCheck, check_stack_transient, require_stack_transient
from engine.memory.errors import NotEnoughMemory
from engine.memory.estimate import Estimate, Workload, estimate
from engine.memory.policy import DEFAULT_RESERVE_BYTES, OffloadMode, OffloadPlan, choose_offload
from engine.memory.recovery import run_with_oom_recovery
from engine.memory.snapshot import GpuInfo, MemorySnapshot
from engine.memory.units import gib, parse_bytes
from engine.memory.watch import MemorySample, MemoryWatch

__all__ = [
    "DEFAULT_RESERVE_BYTES", "Estimate", "GpuInfo", "MemorySample", "MemorySnapshot", "MemoryWatch",
    "NotEnoughMemory", "OffloadMode", "OffloadPlan", "TransientCheck", "Workload", "check_stack_transient",
    "choose_offload", "estimate", "gib", "parse_bytes", "plan_for", "require_stack_transient",
    "run_with_oom_recovery", "snapshot",
]


def snapshot(nvml: Any = None, psutil_module: Any = None) -> MemorySnapshot:
    """The memory of this machine now (never raises for driver trouble)."""
    return MemorySnapshot.capture(nvml=nvml, psutil_module=psutil_module)


def plan_for(spec: ModelSpec, height: int, width: int, frames: int, loras: int = 0,
             snapshot: MemorySnapshot | None = None, choice: str = "auto",
             reserve_bytes: int = DEFAULT_RESERVE_BYTES, dtype: str | None = None,
             storage: str | None = None, text_encoder_storage: str | None = None) -> OffloadPlan:
    """The offload plan for one run. `snapshot=None` captures one now. `dtype` defaults to bf16 on a GPU;
    `storage` is the transformer's (fp8_scaled, gguf-Q4_K, ...) when it stays quantized in memory, and
    `text_encoder_storage` the text encoder file's (an fp8 one keeps its Linear weights fp8)."""
    snap = snapshot if snapshot is not None else MemorySnapshot.capture()
    work = Workload(spec, height, width, frames, loras=loras, dtype=dtype or "bf16", storage=storage,
                    text_encoder_storage=text_encoder_storage)
    return choose_offload(snap, work, choice, reserve_bytes)
