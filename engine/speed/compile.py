"""Regional torch.compile of the experts (diffusers' `compile_repeated_blocks`: each WanTransformerBlock).

Compiled once per loaded model: the mark lives on the module, so it goes when the model goes. A merged LoRA
stack changes weights in place (same tensors, same shapes), which torch.compile's guards do not look at, so
stack changes and weight-slider moves never recompile (tests/engine/speed/test_compile.py counts).
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
from dataclasses import dataclass

log = logging.getLogger(__name__)

_MARK = "_wanstack_compiled"


@dataclass(frozen=True)
class CompilePlan:
    enabled: bool
    requested: str  # auto | on | off
    reason: str
    backend: str = "inductor"

    def to_dict(self) -> dict:
        return {"enabled": self.enabled, "requested": self.requested, "reason": self.reason, "backend": self.backend}


def toolchain_problem(device_type: str, backend: str = "inductor") -> str | None:
    """Why inductor cannot build kernels here (None when it can): Triton on CUDA, a C++ compiler on CPU."""
    if backend != "inductor":
        return None
    if device_type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed (inductor needs it on CUDA)"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler found (inductor needs g++ or clang++ on a CPU)"
    return None


def choose_compile(requested: str, device_type: str, offload_mode: str, *, runtime_loras: bool = False,
                   toolchain: str | None = None, backend: str = "inductor") -> CompilePlan:
    """Pure policy. `toolchain` is toolchain_problem()'s answer; `offload_mode` the memory plan's mode."""
    def off(reason: str) -> CompilePlan:
        return CompilePlan(False, requested, reason, backend)

    if requested == "off":
        return off("off (asked for)")
    if requested == "auto" and device_type != "cuda":
        return off(f"off on {device_type.upper()} by default: compiling takes minutes there; --compile turns it on")
    if toolchain:
        return off(f"off: {toolchain}")
    if offload_mode == "sequential":
        # Leaf-level offload hooks every layer inside the blocks; each hook is a graph break (measured: 22
        # graphs per block instead of 1), so compiling costs minutes and gains nothing.
        return off("off under sequential offload: its per-layer hooks break every block into pieces")
    if runtime_loras:
        # torch.compile does not guard on forward hooks added to layers inside a compiled block, and all
        # blocks share one graph, so per-layer runtime-LoRA hooks could be skipped or misapplied.
        return off("off while the stack has scheduled (runtime) LoRAs: their per-layer hooks are not safe under compile")
    how = "on (asked for)" if requested == "on" else f"on by default on {device_type.upper()}"
    if offload_mode == "group":
        how += "; group offload keeps working (its transfers run between the compiled blocks)"
    return CompilePlan(True, requested, f"{how}: each transformer block compiled once per model, stack changes never recompile",
                       backend)


def compile_experts(transformers, plan: CompilePlan) -> list[str]:
    """Make the experts' blocks run compiled (plan on) or eager (plan off); returns one line per change.

    On: compile_repeated_blocks once per model; a model whose compiled blocks were set aside gets them back
    (same compiled function, so no recompile). Off on a compiled model: the compiled blocks are set aside for
    this run, because torch.compile does not guard on forward hooks added inside a compiled block after it
    was traced (torch._dynamo.config.skip_nnmodule_hook_guards): runtime-LoRA hooks would be silently ignored.
    """
    done = []
    for i, module in enumerate(transformers):
        blocks = [m for m in module.modules() if m.__class__.__name__ in (module._repeated_blocks or ())]
        if plan.enabled and getattr(module, _MARK, None) != plan.backend:
            module.compile_repeated_blocks(backend=plan.backend)
            for block in blocks:
                block._wanstack_compiled_call = block._compiled_call_impl
            setattr(module, _MARK, plan.backend)
            done.append(f"expert {i + 1}: {len(blocks)} blocks compiled with {plan.backend}")
        elif plan.enabled:
            resumed = 0
            for block in blocks:
                if block._compiled_call_impl is None and getattr(block, "_wanstack_compiled_call", None) is not None:
                    block._compiled_call_impl = block._wanstack_compiled_call
                    resumed += 1
            if resumed:
                done.append(f"expert {i + 1}: {resumed} compiled blocks back in use")
        elif is_compiled(module):
            suspended = 0
            for block in blocks:
                if block._compiled_call_impl is not None:
                    block._compiled_call_impl = None
                    suspended += 1
            if suspended:
                done.append(f"expert {i + 1}: compiled blocks set aside for this run ({plan.reason})")
        if done and done[-1].startswith(f"expert {i + 1}:"):
            log.info("compile: %s", done[-1])
    return done


def is_compiled(module) -> bool:
    return getattr(module, _MARK, None) is not None


def dynamo_counts() -> dict[str, int]:
    """torch._dynamo's running totals: frames compiled and distinct graphs. A recompile raises both."""
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"]["total"]), "graphs": int(counters["stats"]["unique_graphs"])}
