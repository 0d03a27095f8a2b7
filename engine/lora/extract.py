"""`lora extract`: turn the difference between two models of one architecture into a LoRA file.

For each Linear weight that differs, the rank-N truncated SVD of `target - source` is stored as
lora_A (down) / lora_B (up) with `alpha = rank` (scale 1). Changed biases become `diff_b`;
changed non-Linear tensors (norms, modulation tables, the patch conv) become full `diff`s, so
applying the file gives back the target up to the rank truncation. `diff_only` stores every
change as a full `diff`. Weights are read tensor by tensor from the safetensors shards, so RAM
holds one pair of tensors at a time plus the LoRA being built.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

from engine.lora import convert, shards
from engine.types import RequestError

log = logging.getLogger(__name__)

# Below this smaller side a full SVD is cheap and exact; above it the randomized one is used.
FULL_SVD_MAX_SIDE = 1024
SVD_OVERSAMPLE = 8
SVD_POWER_ITERATIONS = 4

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)


def _check_same_architecture(source: Path, target: Path) -> list[str]:
    """The expert components both models share, or a RequestError naming the first difference."""
    src_components = shards.expert_components(source)
    tgt_components = shards.expert_components(target)
    if src_components != tgt_components:
        raise RequestError(
            f"source has {'+'.join(src_components)} but target has {'+'.join(tgt_components)}: "
            "extract needs two models of the same architecture"
        )
    for component in src_components:
        a = shards.component_config(source / component)
        b = shards.component_config(target / component)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            k = diff[0]
            raise RequestError(
                f"source and target {component} differ in {k} ({a.get(k)!r} vs {b.get(k)!r}): "
                "extract needs two models of the same architecture"
            )
    return src_components


def _check_shapes(src: shards.TensorReader, tgt: shards.TensorReader, component: str) -> None:
    a, b = set(src.keys()), set(tgt.keys())
    if a != b:
        name = sorted(a ^ b)[0]
        where = "source" if name in a else "target"
        raise RequestError(
            f"{component} tensor {name} exists only in the {where}: extract needs two models of the same architecture"
        )
    for name in sorted(a):
        if src.shape(name) != tgt.shape(name):
            raise RequestError(
                f"{component} tensor {name} is {list(src.shape(name))} in the source but {list(tgt.shape(name))} "
                "in the target: extract needs two models of the same architecture"
            )


def _check_rank(rank: int, reader: shards.TensorReader, component: str) -> None:
    if rank < 1:
        raise RequestError(f"--rank {rank} must be at least 1")
    smallest = None
    for name in reader.keys():
        shape = reader.shape(name)
        if name.endswith(".weight") and len(shape) == 2 and (smallest is None or min(shape) < min(smallest[1])):
            smallest = (name, shape)
    if smallest and rank > min(smallest[1]):
        name, shape = smallest
        raise RequestError(
            f"--rank {rank} is above the size of {component} layer {name.removesuffix('.weight')} "
            f"({shape[0]}x{shape[1]}); pick --rank {min(shape)} or lower"
        )


def low_rank(delta, rank: int):
    """(up, down) with up @ down the best rank-`rank` approximation of `delta` (fp32, out x in).

    Singular values are split evenly (sqrt) between the factors so both stay in a range bf16 keeps well.
    """
    import torch

    side = min(delta.shape)
    if side <= FULL_SVD_MAX_SIDE or rank + SVD_OVERSAMPLE >= side // 2:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, v = torch.svd_lowrank(delta, q=min(rank + SVD_OVERSAMPLE, side), niter=SVD_POWER_ITERATIONS)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    root = s.sqrt()
    return u * root, root[:, None] * vh


def extract_lora(
    source: Path,
    target: Path,
    rank: int,
    out: Path,
    *,
    diff_only: bool = False,
    dtype: str | None = None,
    fmt: str = "diffusers",
    progress: Progress | None = None,
) -> dict:
    """Write `out` and return a JSON-able report with a per-layer relative error.

    `dtype` (fp32|fp16|bf16) is the stored dtype; None keeps the target model's dtype.
    """
    import torch

    source, target, out = Path(source), Path(target), Path(out)
    if fmt not in convert.FORMATS:
        raise RequestError(f"--format {fmt!r} is not one of {', '.join(convert.FORMATS)}")
    if out.suffix != ".safetensors":
        raise RequestError(f"--out {out} must end in .safetensors")
    for folder, label in ((source, "source"), (target, "target")):
        if shards.is_inside(out, folder):
            raise RequestError(f"--out {out} is inside the {label} model folder {folder}; write the LoRA elsewhere")
    if not diff_only and rank < 1:
        raise RequestError(f"--rank {rank} must be at least 1")
    out_dtype = shards.torch_dtype(dtype) if dtype else None
    components = _check_same_architecture(source, target)
    two_experts = len(components) == 2

    readers = []
    try:
        for component in components:
            src = shards.TensorReader(source / component)
            tgt = shards.TensorReader(target / component)
            readers.append((component, src, tgt))
            _check_shapes(src, tgt, component)
            if not diff_only:
                _check_rank(rank, src, component)

        total = sum(len(src.keys()) for _, src, _ in readers)
        done = 0
        lora: dict = {}
        layers: list[dict] = []
        unchanged = 0
        dtype_pairs: set[tuple[str, str]] = set()
        for index, (component, src, tgt) in enumerate(readers):
            def key(module: str, role: str, index: int = index) -> str:
                return convert.lora_key(fmt, index, two_experts, module, role)

            for name in src.keys():
                a = src.get(name)
                b = tgt.get(name)
                stored = out_dtype or b.dtype
                done += 1
                if progress:
                    progress(done, total, f"{component}.{name}")
                if a.dtype != b.dtype:
                    dtype_pairs.add((str(a.dtype).removeprefix("torch."), str(b.dtype).removeprefix("torch.")))
                if torch.equal(a, b):
                    unchanged += 1
                    continue
                delta = b.to(torch.float32) - a.to(torch.float32)
                del a, b
                module, _, leaf = name.rpartition(".")
                if leaf == "bias":
                    lora[key(module, "diff_b")] = delta.to(stored)
                    layers.append({"layer": f"{component}.{module}", "kind": "diff_b", "shape": list(delta.shape)})
                elif leaf == "weight" and delta.ndim == 2 and not diff_only:
                    up, down = low_rank(delta, rank)
                    up, down = up.to(stored).contiguous(), down.to(stored).contiguous()
                    approx = up.to(torch.float32) @ down.to(torch.float32)
                    error = float(torch.linalg.norm(delta - approx) / torch.linalg.norm(delta))
                    lora[key(module, "down")] = down
                    lora[key(module, "up")] = up
                    lora[key(module, "alpha")] = torch.tensor(float(rank), dtype=torch.float32)
                    layers.append({"layer": f"{component}.{module}", "kind": "lora", "shape": list(delta.shape),
                                   "rel_error": error})
                else:
                    # Full difference: norms, modulation tables, the patch conv, or every layer with --diff-only.
                    lora[key(module if leaf == "weight" else name, "diff")] = delta.to(stored)
                    layers.append({"layer": f"{component}.{module if leaf == 'weight' else name}", "kind": "diff",
                                   "shape": list(delta.shape)})
    finally:
        for _, src, tgt in readers:
            src.close()
            tgt.close()

    if not lora:
        raise RequestError(f"source {source} and target {target} are identical: there is nothing to extract")
    metadata = {
        "wanstack.tool": "lora extract",
        "wanstack.source": source.name,
        "wanstack.target": target.name,
        "wanstack.rank": str(rank) if not diff_only else "full",
        "wanstack.experts": ",".join(components),
    }
    convert.write_lora_file(out, lora, metadata)

    warnings = [
        f"source weights are {a} but target weights are {b}: the rounding of that cast is extracted too; "
        "extract against a source stored in the same dtype"
        for a, b in sorted(dtype_pairs)
    ]
    for w in warnings:
        log.warning(w)
    errors = [l["rel_error"] for l in layers if "rel_error" in l]
    report = {
        "out": str(out),
        "format": fmt,
        "rank": None if diff_only else rank,
        "experts": components,
        "tensors": len(lora),
        "layers_lora": sum(l["kind"] == "lora" for l in layers),
        "layers_diff": sum(l["kind"] == "diff" for l in layers),
        "biases": sum(l["kind"] == "diff_b" for l in layers),
        "unchanged": unchanged,
        "max_rel_error": max(errors) if errors else 0.0,
        "mean_rel_error": (math.fsum(errors) / len(errors)) if errors else 0.0,
        "warnings": warnings,
        "layers": layers,
    }
    log.info("extracted %d LoRA layers, %d full diffs, %d biases into %s (max rel error %.3g)",
             report["layers_lora"], report["layers_diff"], report["biases"], out, report["max_rel_error"])
    return report
