"""Apply an OffloadPlan to a diffusers pipeline with diffusers' own hooks, and undo it completely.

Modes:
- none: every component on the device (the text encoder may stay on the CPU; diffusers' Wan
  pipelines run it where its weights are and move the embeddings over).
- model: `pipe.enable_model_cpu_offload(device=...)` (accelerate hook chain, one model at a time).
  With the text encoder on the CPU the same accelerate `cpu_offload_with_hook` chain is built over
  the other components, because diffusers would re-hook the text encoder after every call.
- group: diffusers group offloading, block level, one block per group, CUDA streams on CUDA.
  The UMT5 text encoder has no block list at its top level (block level would onload it whole),
  so it is group-offloaded at its `encoder` stack, whose `block` list holds the 24 layers.
- sequential: diffusers group offloading at leaf level (streams on CUDA). Not accelerate's
  `enable_sequential_cpu_offload`: that parks weights on the meta device, so a LoRA merge written
  into `param.data` after the hooks are in place would be silently lost (and it fails on CPU
  with torch 2.13). Leaf-level group offloading has the same memory profile and keeps real CPU weights.

Weights stay real tensors in every mode, so a LoRA merge that edits `param.data` in place after
`apply_plan` is honoured (tests/engine/memory/test_offload.py checks each mode).
"""
from __future__ import annotations

import logging
from typing import Any

from engine.memory.policy import OffloadMode, OffloadPlan

log = logging.getLogger(__name__)

_GROUP_HOOK_NAMES = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")
_PLAN_ATTR = "_wanstack_offload"


def _modules(pipe) -> dict[str, Any]:
    import torch

    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def apply_plan(pipe, plan: OffloadPlan, device) -> None:
    """Put `pipe` into `plan`'s mode on `device` (undoing any previous mode first)."""
    import torch

    device = torch.device(device)
    undo_plan(pipe)
    mode = OffloadMode(plan.mode)
    modules = _modules(pipe)
    te_cpu = plan.text_encoder_on_cpu and "text_encoder" in modules
    if mode is OffloadMode.NONE:
        for name, module in modules.items():
            module.to("cpu" if (te_cpu and name == "text_encoder") else device)
    elif mode is OffloadMode.MODEL:
        if te_cpu:
            _model_offload_without_text_encoder(pipe, modules, device)
        else:
            pipe.enable_model_cpu_offload(device=device)
    else:
        leaf = mode is OffloadMode.SEQUENTIAL
        for name, module in modules.items():
            if te_cpu and name == "text_encoder":
                module.to("cpu")
                continue
            _group_offload(name, module, device, leaf)
    if getattr(pipe, "vae", None) is not None and hasattr(pipe.vae, "enable_tiling"):
        if plan.vae_tiling:
            pipe.vae.enable_tiling()
        else:
            pipe.vae.disable_tiling()
    setattr(pipe, _PLAN_ATTR, {"mode": mode.value, "vae_tiling": plan.vae_tiling,
                               "text_encoder_on_cpu": bool(te_cpu), "device": str(device)})
    log.info("offload: %s on %s", plan.label, device)


def undo_plan(pipe) -> None:
    """Remove every offload hook (accelerate's and diffusers') and bring all weights back to the CPU."""
    from diffusers.hooks import HookRegistry

    modules = _modules(pipe)
    pipe.remove_all_hooks()  # accelerate hooks of model offload (restores forward, weights stay real)
    for module in modules.values():
        for sub in module.modules():
            registry = getattr(sub, "_diffusers_hook", None)
            if isinstance(registry, HookRegistry):
                for name in _GROUP_HOOK_NAMES:
                    registry.remove_hook(name, recurse=False)
    for module in modules.values():
        module.to("cpu")
    if getattr(pipe, "vae", None) is not None and hasattr(pipe.vae, "disable_tiling"):
        pipe.vae.disable_tiling()
    if hasattr(pipe, _PLAN_ATTR):
        delattr(pipe, _PLAN_ATTR)


def applied_mode(pipe) -> dict | None:
    """What apply_plan last did to this pipeline, or None."""
    return getattr(pipe, _PLAN_ATTR, None)


def active_hooks(pipe) -> list[str]:
    """Every offload hook still attached to the pipeline's modules, as 'component.submodule: hook' strings."""
    from diffusers.hooks import HookRegistry

    found = []
    for cname, module in _modules(pipe).items():
        for sname, sub in module.named_modules():
            where = f"{cname}.{sname}" if sname else cname
            if hasattr(sub, "_hf_hook"):
                found.append(f"{where}: accelerate {type(sub._hf_hook).__name__}")
            registry = getattr(sub, "_diffusers_hook", None)
            if isinstance(registry, HookRegistry) and registry.hooks:
                found.extend(f"{where}: diffusers {name}" for name in registry.hooks)
            forward = sub.__dict__.get("forward")
            if forward is not None and getattr(forward, "__func__", None) is not type(sub).forward:
                found.append(f"{where}: wrapped forward")
    return found


def _group_offload(name: str, module, device, leaf: bool) -> None:
    from diffusers.hooks import apply_group_offloading

    kwargs: dict[str, Any] = dict(
        onload_device=device, offload_device="cpu", offload_type="leaf_level" if leaf else "block_level",
        use_stream=device.type == "cuda",
    )
    if not leaf:
        kwargs["num_blocks_per_group"] = 1
    target = module
    if name == "text_encoder" and not leaf and hasattr(getattr(module, "encoder", None), "block"):
        target = module.encoder  # UMT5EncoderModel: the 24 layers live in encoder.block
    if target is module and hasattr(module, "enable_group_offload"):
        module.enable_group_offload(**kwargs)
    else:
        apply_group_offloading(target, **kwargs)


def _model_offload_without_text_encoder(pipe, modules: dict, device) -> None:
    """enable_model_cpu_offload's chain minus the text encoder, which stays (and runs) on the CPU."""
    from accelerate import cpu_offload_with_hook

    pipe.to("cpu")
    hooks = []
    order = [n for n in (pipe.model_cpu_offload_seq or "").split("->") if n in modules and n != "text_encoder"]
    order += [n for n in modules if n not in order and n != "text_encoder"]
    for name in order:
        _, hook = cpu_offload_with_hook(modules[name], device, prev_module_hook=hooks[-1] if hooks else None)
        hooks.append(hook)
    if len(hooks) > 1:
        # Close the ring: diffusers frees the last model (the VAE) at the end of each call through
        # maybe_free_model_hooks; without that call, the first model of the next run frees it.
        hooks[0].hook.prev_module_hook = hooks[-1]
    modules["text_encoder"].to("cpu")
