"""Bake a LoRA stack into a copy of a diffusers-layout Wan model folder (`python -m engine lora merge`).

Lean: the LoRA engine plans the stack from the safetensors headers alone (planning.plan_stack), then
engine/lora/rewrite.py streams each shard of the touched experts tensor by tensor through the
engine's own merge math (merge.merged_tensor, the code in-place application runs), so peak RAM is
about one tensor plus the stack's patches. Unchanged components are hard-linked, the copy is
written to a temporary sibling folder and renamed into place, and the source is never written.
A recipe or `--comfyui` model (single files) is baked into a new recipe by engine/lora/bake_files.py.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from engine.models.catalog import EXPERT_COMPONENT, get_spec, with_lora_cap
from engine.lora import rewrite, shards
from engine.types import RequestError, Stack

log = logging.getLogger(__name__)


def merge_model(
    model_dir,
    stack: Stack,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    skip_failing: bool = False,
    allow_pickle: bool = False,
    lora_caps: dict[str, int] | None = None,
    resolve: Callable[[str], Path] | None = None,
    progress: rewrite.Progress | None = None,
) -> dict[str, Any]:
    """Write `out_dir`: `model_dir` with `stack` merged into its experts; returns the summary and the
    LoRA engine's per-entry report (status, weights and coverage per expert, warnings).

    `model_dir` is a diffusers model folder or a listed ModelInfo. A recipe or `--comfyui` model (single
    files) is baked into a new recipe instead: `out_dir` then names its .json (engine/lora/bake_files.py).

    `dtype` (bf16|fp16|fp32) casts every expert's floating weights, except the modules diffusers keeps in
    fp32 when loading in a lower precision (norms, modulation tables, time embedder); the merge runs on the
    cast weights, as in-place application on a model loaded with that torch_dtype does. None keeps the
    stored dtypes.
    Entry files are taken as given (absolute or relative to the working directory) unless `resolve` is set.
    """
    from engine.models.detect import detect
    from engine.lora.library import LoraLibrary
    from engine.lora.merge import merged_tensor, model_param_shapes
    from engine.lora.planning import plan_stack

    if not stack.entries:
        raise RequestError("no --lora given; pass at least one PATH[=WEIGHT[,APPLIES_TO]]")
    if resolve is None:
        def resolve(file: str) -> Path:
            return Path(file).expanduser().resolve()

    library = LoraLibrary(Path.cwd(), allow_pickle=allow_pickle)
    if getattr(model_dir, "source", "diffusers") != "diffusers":
        from engine.lora.bake_files import bake_recipe

        info = model_dir
        if not info.ok or not info.type:
            raise RequestError(f"--model {info.id}: {info.reason}")
        if dtype:
            raise RequestError(f"--dtype: model {info.id} is made of single files, and a baked single file keeps its "
                               f"storage ({info.storage}); leave --dtype out")
        spec = with_lora_cap(get_spec(info.type), lora_caps or {})
        return bake_recipe(info, spec, stack, out_dir, library=library, resolve=resolve, skip_failing=skip_failing,
                           progress=progress)
    src = Path(getattr(model_dir, "path", model_dir))
    out = Path(out_dir)
    rewrite.check_output(src, out)
    info = detect(src)
    if not info.ok or not info.type:
        raise RequestError(f"--model {src}: {info.reason}")
    spec = with_lora_cap(get_spec(info.type), lora_caps or {})
    torch_dtype = shards.torch_dtype
    target_dtype = torch_dtype(dtype) if dtype else None
    shapes = {e: model_param_shapes(src / EXPERT_COMPONENT[e]) for e in spec.experts}
    plan = plan_stack(library, spec, stack, shapes, skip_failing=skip_failing, resolve=resolve, allow_schedules=False)
    desired, results = plan.desired, plan.rows
    expert_of = {EXPERT_COMPONENT[e]: e for e in spec.experts}
    touched = {EXPERT_COMPONENT[e] for e, params in desired.items()
               if any(c.weight != 0.0 for cs in params.values() for c in cs)}

    keep_fp32 = None
    if target_dtype is not None:
        from diffusers import WanTransformer3DModel

        # Loading with torch_dtype keeps these modules in fp32 (diffusers' own list); write them as they are used.
        kept = tuple(WanTransformer3DModel._keep_in_fp32_modules or ())

        def keep_fp32(name: str) -> bool:
            return any(part in kept for part in name.split("."))

    def merge(component: str, name: str, w0):
        contribs = [c for c in desired.get(expert_of.get(component), {}).get(name, []) if c.weight != 0.0]
        if not contribs:
            return None
        if target_dtype is not None and w0.is_floating_point():
            # Merge on the weights in the dtype they are used in, as in-place application does.
            w0 = w0.to(torch_dtype(rewrite.output_code(shards.st_dtype_code(w0.dtype), name, dtype, keep_fp32)))
        return merged_tensor(w0, contribs)

    record = {
        "source": str(src.resolve()),
        "model_type": spec.type,
        "dtype": dtype,
        "stack": stack.to_list(),
        "loras": [{k: r.get(k) for k in ("file", "sha256", "status", "weights")} for r in results],
    }
    report = rewrite.rewrite_model(src, out, merge, touched, dtype=dtype, keep_fp32=keep_fp32, marker=record,
                                   progress=progress)
    report.update(model=str(src), model_type=spec.type, loras=results)
    log.info("merged %d LoRA(s) into %s: %s", sum(r["status"] == "applied" for r in results), out,
             report["changed_tensors"])
    return report
