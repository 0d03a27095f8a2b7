"""Bake a LoRA stack into single-file experts (`lora merge` on a recipe or `--comfyui` model).

The result is a new recipe: `NAME.json` naming new expert files written beside it
(`NAME_high_noise.safetensors` / `NAME_low_noise.safetensors`, or `NAME.safetensors` for one expert) and
the source's own text encoder, VAE, tokenizer and image encoder files. Each new file keeps its source's
layout: the same tensor names and prefix, the same storage, the scaled-fp8 marker and scales, and the
source's metadata, so WanStack and ComfyUI load it like the original. An expert the stack leaves alone is
not copied: the recipe names the original file.

The merge math is the in-place merge's (merge.merged_tensor, merge.write_merged_fp8), so a baked file
equals the model the generator merges in memory, byte for byte (fp8 included: merged in fp32 from W0 and
the file's scale, rounded once; the scale is recomputed only where the merged weights outgrow fp8's range).
GGUF experts are refused: their blocks would have to be requantized; generate applies LoRAs to them at run
time instead. Files are streamed one tensor at a time and written under temp names, renamed into place,
the recipe last; a failure leaves nothing under a final name.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from engine.models.catalog import EXPERT_COMPONENT
from engine.fileio import atomic_path, atomic_write_json
from engine.lora.rewrite import Progress
from engine.types import RequestError

log = logging.getLogger(__name__)
_ST_FP8 = "F8_E4M3"


def output_files(out: Path, experts: tuple[str, ...]) -> dict[str, Path]:
    """expert -> the file a baked expert is written to, beside the recipe `out`."""
    if len(experts) == 1:
        return {experts[0]: out.with_suffix(".safetensors")}
    return {e: out.with_name(f"{out.stem}_{e}.safetensors") for e in experts}


def check_output(out: Path, experts: tuple[str, ...]) -> None:
    if out.suffix != ".json":
        raise RequestError(f"--out {out}: this model is made of single files, so the merged model is a recipe; "
                           f"name a new .json file (e.g. models/{out.stem or 'my-model'}.json) and its expert "
                           "files are written beside it")
    for p in (out, *output_files(out, experts).values()):
        if p.exists():
            raise RequestError(f"--out {out}: {p} already exists; pick a new name")


def bake_recipe(info, spec, stack, out: str | Path, *, library, resolve: Callable[[str], Path],
                skip_failing: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Write the recipe `out` for `info` (a recipe/--comfyui ModelInfo) with `stack` baked into its experts."""
    from engine.lora.planning import plan_stack
    from engine.models.experts import expert_paths, file_shapes
    from engine.models.headers import read_header

    out = Path(out).expanduser().resolve()
    started = time.monotonic()
    paths = {e: p.resolve() for e, p in expert_paths(info).items()}
    for expert, path in paths.items():
        if path.is_dir():
            raise RequestError(f"model {info.id}: its {EXPERT_COMPONENT[expert]} is a diffusers folder ({path}); "
                               "bake a diffusers model folder instead, or name single files in the recipe")
        if read_header(path).format == "gguf":
            raise RequestError(f"model {info.id}: {path.name} is GGUF ({info.storage}); its quantized blocks cannot "
                               "take a baked LoRA without requantizing. Pass the stack to generate instead: WanStack "
                               "applies LoRAs to GGUF experts at run time (mode: runtime)")
    check_output(out, spec.experts)
    shapes = {e: file_shapes(p) for e, p in paths.items()}
    plan = plan_stack(library, spec, stack, shapes, skip_failing=skip_failing, resolve=resolve, allow_schedules=False)
    desired = {e: {n: [c for c in cs if c.weight != 0.0] for n, cs in params.items()}
               for e, params in plan.desired.items()}
    desired = {e: {n: cs for n, cs in params.items() if cs} for e, params in desired.items()}
    targets = output_files(out, spec.experts)
    record = {"source": info.id, "source_files": {e: str(p) for e, p in paths.items()}, "model_type": spec.type,
              "stack": stack.to_list(),
              "loras": [{k: r.get(k) for k in ("file", "sha256", "status", "weights")} for r in plan.rows]}
    total = sum(len(read_header(paths[e]).tensors) for e in desired if desired[e])
    done = [0, total]
    written: list[Path] = []
    changed: dict[str, int] = {}
    try:
        for expert in spec.experts:
            if not desired.get(expert):
                continue
            changed[EXPERT_COMPONENT[expert]] = _bake_file(paths[expert], targets[expert], desired[expert], record,
                                                           progress, done)
            written.append(targets[expert])
        recipe = {"schema": 1, "name": out.stem, "type": info.type}
        for expert in spec.experts:
            component = EXPERT_COMPONENT[expert]
            recipe[component] = targets[expert].name if targets[expert] in written else str(paths[expert])
        for component in ("text_encoder", "vae", "tokenizer", "image_encoder"):
            if info.files.get(component):  # absolute: the new recipe may live elsewhere
                recipe[component] = str(Path(info.files[component]).resolve())
        atomic_write_json(out, recipe)
    except BaseException as e:
        for p in written:  # the recipe is written last: without it, nothing of a failed bake stays behind
            p.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RequestError(f"could not write {out}: {e}; nothing was left behind") from None
        raise
    log.info("baked %d LoRA(s) into %s: %s", sum(r["status"] == "applied" for r in plan.rows), out, changed)
    return {"out": str(out), "source": info.id, "model_type": spec.type, "rewritten": sorted(changed),
            "changed_tensors": changed, "files": {EXPERT_COMPONENT[e]: str(targets[e]) for e in spec.experts
                                                  if targets[e] in written},
            "seconds": round(time.monotonic() - started, 2), "loras": plan.rows}


def _bake_file(src: Path, dst: Path, desired: dict[str, list], record: dict, progress: Progress | None,
               done: list[int]) -> int:
    """Stream `src` into `dst` with the contributions merged; returns how many tensors changed."""
    import torch

    from engine.lora import shards
    from engine.lora.files import read_safetensors_header
    from engine.lora.merge import WeightSource, merged_tensor, write_merged_fp8
    from engine.models.keys import MARKER, scale_key_of, split_prefix, transformer_name_map

    header, _ = read_safetensors_header(src)
    meta = dict(header.pop("__metadata__", None) or {})
    keys = list(header)
    name_of = {key: name for name, key in transformer_name_map(keys).items()}
    reader = WeightSource(src)
    scale_of = {k: scale_key_of(k, header) for k in keys if header[k]["dtype"] == _ST_FP8}
    scale_of = {k: v for k, v in scale_of.items() if v is not None}
    # fp8 weight scales (ComfyUI's `scale_weight` or the newer `weight_scale`) -> the value to write
    scales: dict[str, float] = {sk: float(reader.read(sk, torch.float32)) for sk in scale_of.values()}
    if not scales:  # a plain fp8 file has no scales: add them (and the marker) only if a merge outgrows fp8's range
        scales.update(_plain_fp8_scales(reader, header, name_of, desired))
    extra = [k for k in scales if k not in header]
    if extra and not any(k.rsplit(".", 1)[-1] == MARKER for k in keys):
        extra.append(split_prefix([k for k in keys]) + MARKER)
    layout = [(k, header[k]["dtype"], tuple(header[k]["shape"])) for k in keys if k not in scales]
    layout += [(k, header[k]["dtype"] if k in header else "F32", tuple(header[k]["shape"]) if k in header else ())
               for k in sorted(scales)]
    layout += [(k, _ST_FP8, (0,)) for k in extra if k.endswith(MARKER)]
    meta["wanstack_merge"] = json.dumps(record)
    changed = 0
    with atomic_path(dst) as tmp:
        with shards.ShardWriter(tmp, layout, meta) as writer:
            for key, code, _shape in layout:
                if key in scales:
                    writer.write(key, torch.tensor(scales[key], dtype=torch.float32).to(shards.torch_dtype(code))
                                 .reshape(_shape))
                    continue
                if key.endswith(MARKER) and key in extra:
                    writer.write(key, torch.empty(0, dtype=torch.float8_e4m3fn))
                    continue
                w0 = reader.read(key, shards.torch_dtype(code))
                contribs = desired.get(name_of.get(key, ""))
                if contribs:
                    if code == _ST_FP8:
                        scale_key = scale_of.get(key) or key[: -len("weight")] + "scale_weight"
                        s_new, _ = write_merged_fp8(w0, contribs, None, scales.get(scale_key, 1.0), name=key)
                        if scale_key in scales:
                            scales[scale_key] = s_new
                        elif s_new != 1.0:  # pragma: no cover - _plain_fp8_scales sized these up front
                            raise RuntimeError(f"{key}: scale {s_new} was not planned")
                    else:
                        merged_tensor(w0, contribs)
                    changed += 1
                writer.write(key, w0)
                del w0
                done[0] += 1
                if progress:
                    progress(done[0], done[1], key)
    return changed


def _plain_fp8_scales(reader, header: dict, name_of: dict[str, str], desired: dict[str, list]) -> dict[str, float]:
    """For a plain fp8 file: the scale_weight entries the baked file needs (the weights whose merge outgrows
    fp8's range at scale 1), found with write_merged_fp8's own measuring pass."""
    import torch

    from engine.lora.merge import write_merged_fp8

    out = {}
    for key, entry in header.items():
        contribs = desired.get(name_of.get(key, ""))
        if not contribs or entry["dtype"] != _ST_FP8:
            continue
        w0 = reader.read(key, torch.float8_e4m3fn)
        s_new, _ = write_merged_fp8(w0, contribs, None, 1.0, name=key)
        if s_new != 1.0:
            out[key[: -len("weight")] + "scale_weight"] = 1.0  # the value is set when the weight is merged
    return out
