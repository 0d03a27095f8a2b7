"""Offload policy (pure): a snapshot, a workload and the user's choice -> an OffloadPlan with reasons in words."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engine.memory.estimate import Estimate, Workload
from engine.memory.snapshot import MemorySnapshot
from engine.memory.units import GIB, gib
from engine.types import OFFLOAD_CHOICES, OffloadMode, RequestError

DEFAULT_RESERVE_BYTES = 1 * GIB  # left free for the desktop, the browser and other apps


@dataclass(frozen=True)
class OffloadPlan:
    mode: OffloadMode
    vae_tiling: bool = False
    text_encoder_on_cpu: bool = False
    fits: bool = True
    estimate_bytes: dict[str, Any] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    device: str = "cuda"  # "cuda" or "cpu"
    free_vram_bytes: int | None = None
    usable_vram_bytes: int | None = None
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    choice: str = "auto"
    workload: Workload | None = field(default=None, compare=False, repr=False)  # to re-price after escalation

    def __post_init__(self):
        object.__setattr__(self, "mode", OffloadMode(self.mode))
        object.__setattr__(self, "reasons", tuple(self.reasons))

    @property
    def label(self) -> str:
        return self.mode.label + (" with VAE tiling" if self.vae_tiling else "")

    @property
    def peak_bytes(self) -> int | None:
        return self.estimate_bytes.get("peak")

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value, "vae_tiling": self.vae_tiling, "text_encoder_on_cpu": self.text_encoder_on_cpu,
            "fits": self.fits, "estimate_bytes": dict(self.estimate_bytes), "reasons": list(self.reasons),
            "device": self.device, "free_vram_bytes": self.free_vram_bytes,
            "usable_vram_bytes": self.usable_vram_bytes, "reserve_bytes": self.reserve_bytes, "choice": self.choice,
            "label": self.label,
        }

    def escalated(self) -> "OffloadPlan | None":
        """The next heavier plan after an out-of-memory: the next mode, with VAE tiling on; None past the last."""
        nxt = self.mode.heavier()
        if nxt is None:
            if self.vae_tiling:
                return None
            nxt = self.mode
        est = None
        if self.workload is not None:
            est = self.workload.estimate(nxt.value, True, self.text_encoder_on_cpu, self.device)
        reason = f"escalated to {nxt.label} with VAE tiling after running out of memory with {self.label}"
        return dataclasses.replace(
            self, mode=nxt, vae_tiling=True, estimate_bytes=est.to_dict() if est else self.estimate_bytes,
            reasons=self.reasons + (reason,),
            fits=(est.peak_bytes <= self.usable_vram_bytes) if est and self.usable_vram_bytes is not None else self.fits,
        )


# Candidates from fastest to slowest. VAE tiling costs a little time. Moving whole models per run
# (model offload) costs seconds; group offload with CUDA streams hides most transfers behind
# compute. Running the 5.7B-parameter text encoder on the CPU costs tens of seconds every time the
# prompt changes, so it comes after group offload; sequential (leaf-level) offload is the slowest.
_CANDIDATES = tuple(
    (OffloadMode(mode), tiling, te_cpu)
    for mode, te_cpu in (("none", False), ("model", False), ("group", False), ("none", True), ("model", True),
                         ("group", True), ("sequential", False), ("sequential", True))
    for tiling in (False, True)
)


def choose_offload(snapshot: MemorySnapshot, workload: Workload, choice: str = "auto",
                   reserve_bytes: int = DEFAULT_RESERVE_BYTES, torch_index: int = 0) -> OffloadPlan:
    """The lightest plan whose estimated peak fits free VRAM minus the reserve (or the user's fixed mode)."""
    if choice not in OFFLOAD_CHOICES:
        raise RequestError(f"offload {choice!r} is not one of {', '.join(OFFLOAD_CHOICES)}")
    free = snapshot.free_vram_bytes(torch_index)
    if free is None:
        return _plan_for_cpu(snapshot, workload, choice)
    usable = max(0, free - reserve_bytes)
    everything = workload.estimate("none")
    tried: list[tuple[OffloadMode, bool, bool, Estimate]] = []
    chosen = None
    for mode, tiling, te_cpu in _CANDIDATES:
        if choice != "auto" and mode.value != choice:
            continue
        est = workload.estimate(mode.value, tiling, te_cpu)
        tried.append((mode, tiling, te_cpu, est))
        if est.peak_bytes <= usable:
            chosen = (mode, tiling, te_cpu, est)
            break
    fits = chosen is not None
    if not fits:
        # Nothing fits: take the smallest variant of the allowed modes and say what to lower.
        chosen = min(tried, key=lambda t: t[3].peak_bytes)
    mode, tiling, te_cpu, est = chosen
    room = f"{gib(usable)} free after the {gib(reserve_bytes)} reserve" if reserve_bytes else f"{gib(usable)} free"
    plan_label = mode.label + (" with VAE tiling" if tiling else "")
    reasons = []
    if fits and mode is OffloadMode.NONE and not tiling and not te_cpu:
        reasons.append(f"needs {gib(est.peak_bytes)}, {room}: everything stays on the GPU ({mode.label})")
    elif fits:
        reasons.append(f"needs {gib(everything.peak_bytes)}, {room}: {plan_label} (est. {gib(est.peak_bytes)})")
    elif choice == "auto":
        reasons.append(
            f"needs {gib(everything.peak_bytes)}, {room}: even {plan_label} needs about {gib(est.peak_bytes)}, "
            f"so this run will probably run out of memory; lower the frames or the resolution, or enable fewer LoRAs"
        )
    else:
        auto = choose_offload(snapshot, workload, "auto", reserve_bytes, torch_index)
        hint = f"; auto would choose {auto.label} (est. {gib(auto.peak_bytes)})" if auto.fits else \
            "; nothing fits, so lower the frames or the resolution"
        reasons.append(f"you chose {mode.label}: it needs about {gib(est.peak_bytes)}, {room}, "
                       f"so this run will probably run out of memory{hint}")
    reasons.extend(_details(workload, est, tiling, te_cpu))
    reasons.extend(_ram_reasons(snapshot, est, mode))
    return OffloadPlan(mode=mode, vae_tiling=tiling, text_encoder_on_cpu=te_cpu, fits=fits,
                       estimate_bytes=est.to_dict(), reasons=tuple(reasons), device="cuda", free_vram_bytes=free,
                       usable_vram_bytes=usable, reserve_bytes=reserve_bytes, choice=choice, workload=workload)


_PHASE_WORDS = {"text_encode": "text encoding", "denoise": "denoising", "vae_decode": "VAE decoding",
                "lora_merge": "the LoRA merge", "image_encode": "image encoding"}


def _details(workload: Workload, est: Estimate, tiling: bool, te_cpu: bool) -> list[str]:
    size = f"{workload.width}x{workload.height}x{workload.frames}"
    out = [f"The peak comes during {_PHASE_WORDS.get(est.peak_phase, est.peak_phase)} "
           f"({size}, {est.tokens} tokens per step)."]
    if tiling:
        untiled = workload.decode_bytes(False)
        out.append(f"VAE tiling is on: decoding {size} in one piece would need {gib(untiled)} of working memory.")
    if te_cpu:
        out.append(f"The text encoder runs on the CPU: its weights alone need {gib(est.weights['text_encoder'])}.")
    if workload.n_experts > 1 and est.mode == "model":
        out.append("Only one of the two experts is on the GPU at a time.")
    elif workload.n_experts > 1 and est.mode in ("group", "sequential"):
        out.append("Both experts stay in system RAM; only the block running now (and the next) is on the GPU.")
    if workload.loras:
        out.append(f"{workload.loras} LoRA(s) are merged into the weights before the run "
                   f"(a {gib(est.working['lora_merge'])} transient, nothing per step).")
    return out


def _ram_reasons(snapshot: MemorySnapshot, est: Estimate, mode: OffloadMode) -> list[str]:
    ram = snapshot.ram_available_bytes
    if ram is None or mode is OffloadMode.NONE:
        return []
    if est.ram_bytes > ram:
        return [f"Offloaded weights need about {gib(est.ram_bytes)} of system RAM and {gib(ram)} is available here: "
                f"expect swapping, or close other programs."]
    return []


def _plan_for_cpu(snapshot: MemorySnapshot, workload: Workload, choice: str) -> OffloadPlan:
    cpu_work = dataclasses.replace(workload, dtype="fp32", vae_dtype="fp32")
    ram = snapshot.ram_available_bytes
    chosen = None
    for tiling in (False, True):
        est = cpu_work.estimate("none", tiling, True, device="cpu")
        chosen = est
        if ram is None or est.ram_bytes <= ram:
            break
    est = chosen
    fits = ram is None or est.ram_bytes <= ram
    why = snapshot.reason or "no GPU figures"
    reasons = [f"No usable GPU ({why}): running on the CPU, planning for system RAM."]
    if choice not in ("auto", "none"):
        reasons.append(f"Offload mode {choice!r} has no effect on the CPU; using none.")
    if ram is None:
        reasons.append(f"needs about {gib(est.ram_bytes)} of RAM (available RAM unknown)")
    elif fits:
        reasons.append(f"needs {gib(est.ram_bytes)} of RAM, {gib(ram)} available: fits")
    else:
        reasons.append(f"needs {gib(est.ram_bytes)} of RAM, only {gib(ram)} available: lower the frames or "
                       f"the resolution, or use a machine with a GPU")
    if est.vae_tiling:
        reasons.append("VAE tiling is on to keep the decode within RAM.")
    reasons.append("The CPU computes in fp32 and is very slow for real models; the demo models are meant for it.")
    return OffloadPlan(mode=OffloadMode.NONE, vae_tiling=est.vae_tiling, text_encoder_on_cpu=True, fits=fits,
                       estimate_bytes=est.to_dict(), reasons=tuple(reasons), device="cpu", free_vram_bytes=None,
                       usable_vram_bytes=None, reserve_bytes=0, choice=choice, workload=cpu_work)
