"""Before a run: does merging the LoRA stack fit? (The per-model LoRA caps consult memory through this.)

Merging computes W = W0 + sum_i w_i s_i (B_i @ A_i) in fp32 one layer at a time (DESIGN.md), so
the transient is set by the largest touched layer, the FFN up-projection (ffn x width): an fp32
copy of W0, the fp32 accumulator and the fp32 B@A product, plus the result in the weight dtype,
14 bytes per parameter of that layer (engine.memory.estimate.LORA_MERGE_BYTES_PER_PARAM). It does
not grow with the number of LoRAs. The merge runs where the weights are: on the GPU with no
offload, in system RAM under any offload mode or on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.memory.errors import NotEnoughMemory
from engine.memory.estimate import Workload
from engine.memory.policy import OffloadMode, OffloadPlan
from engine.memory.snapshot import MemorySnapshot
from engine.memory.units import gib


@dataclass(frozen=True)
class TransientCheck:
    fits: bool
    transient_bytes: int
    where: str  # "gpu" or "ram"
    available_bytes: int | None
    message: str


def check_stack_transient(workload: Workload, plan: OffloadPlan, snapshot: MemorySnapshot) -> TransientCheck:
    """Whether the merge transient of `workload.loras` LoRAs fits, given the plan and the memory now."""
    transient = workload.lora_merge_bytes()
    m = workload.spec.memory
    layer = f"the largest touched layer (FFN, {m.ffn}x{m.width})"
    if not transient:
        return TransientCheck(True, 0, "ram", None, "no LoRAs to merge")
    on_gpu = plan.device == "cuda" and OffloadMode(plan.mode) is OffloadMode.NONE
    if on_gpu:
        est = workload.estimate("none", plan.vae_tiling, plan.text_encoder_on_cpu)
        resident = est.phases.get("lora_merge", transient) - transient
        available = None if plan.usable_vram_bytes is None else plan.usable_vram_bytes - resident
        where, room = "gpu", "VRAM"
    else:
        available = snapshot.ram_available_bytes
        where, room = "ram", "system RAM"
    if available is None or transient <= available:
        return TransientCheck(True, transient, where, available,
                              f"merging {workload.loras} LoRA(s) needs a {gib(transient)} working copy of {layer} in {room}")
    fix = "choose model or group offload so the merge runs in system RAM, or enable fewer LoRAs" if on_gpu else \
        "close other programs or enable fewer LoRAs"
    return TransientCheck(
        False, transient, where, available,
        f"merging {workload.loras} LoRA(s) needs a {gib(transient)} working copy of {layer} in {room}, "
        f"but only {gib(max(0, available))} is left: {fix}",
    )


def require_stack_transient(workload: Workload, plan: OffloadPlan, snapshot: MemorySnapshot) -> TransientCheck:
    """check_stack_transient, raising NotEnoughMemory (before any work) when it does not fit."""
    check = check_stack_transient(workload, plan, snapshot)
    if not check.fits:
        raise NotEnoughMemory(check.message)
    return check
