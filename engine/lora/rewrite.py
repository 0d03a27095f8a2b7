"""Lean model rewrite for `lora merge`: a copy of a diffusers model folder with some tensors changed, streamed.

Only the expert components whose weights change (or whose dtype changes) are rewritten; every
other file is hard-linked (or copied when linking is impossible). Each shard is streamed with
`ShardWriter`, so peak RAM is about one tensor plus the stack's patches. The copy is written to a
hidden temp folder beside the output and renamed into place at the end; any failure (a full disk
included) removes the temp folder, so there is never a partial model.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from engine.fileio import atomic_path
from engine.lora import shards
from engine.types import RequestError

log = logging.getLogger(__name__)

MERGE_MARKER = "wanstack_merge.json"
Progress = Callable[[int, int, str], None]  # (done, total, tensor name)
# (component, parameter name, source tensor) -> merged tensor in fp32 or the source dtype, or None when untouched.
MergeFn = Callable[[str, str, object], object]


def check_output(model_dir: Path, out_dir: Path) -> None:
    """Refuse outputs that would overwrite or nest inside the source, or clobber an existing folder."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if shards.is_inside(out_dir, model_dir):
        raise RequestError(f"--out {out_dir} is inside the source model {model_dir}; write the merged model to a new folder")
    if shards.is_inside(model_dir, out_dir):
        raise RequestError(f"--out {out_dir} contains the source model {model_dir}; write the merged model to a new folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RequestError(f"--out {out_dir} already exists and is not empty; pick a new folder name")


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copy2(src, dst)
        return "copied"


def _mirror(src: Path, dst: Path, counts: dict[str, int]) -> None:
    """Recreate `src` under `dst` with hard links (copies across file systems)."""
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            how = _link_or_copy(Path(root) / name, dst / rel / name)
            counts[how] = counts.get(how, 0) + 1


_FLOAT_CODES = ("F32", "F16", "BF16", "F64")


def output_code(stored_code: str, name: str, dtype, keep_fp32: Callable[[str], bool] | None) -> str:
    """The safetensors dtype a tensor is written in: `dtype` for floating tensors (fp32 for the names
    `keep_fp32` selects, as diffusers keeps them when loading in a lower precision), else as stored."""
    if dtype is None or stored_code not in _FLOAT_CODES:
        return stored_code
    if keep_fp32 is not None and keep_fp32(name):
        return "F32"
    return shards.st_dtype_code(dtype)


def _rewrite_component(src_dir: Path, dst_dir: Path, component: str, merge: MergeFn, dtype, progress: Progress | None,
                       done_total: list[int], counts: dict[str, int], keep_fp32=None) -> int:
    """Stream every shard of one component through `merge`; returns how many tensors changed."""
    import torch

    dst_dir.mkdir(parents=True)
    changed = 0
    with shards.TensorReader(src_dir) as reader:
        shard_files = {p.name for p in reader.files.values()}
        for item in sorted(src_dir.iterdir()):
            if item.name in shard_files or item.name.endswith(".safetensors.index.json"):
                continue
            if item.is_dir():
                _mirror(item, dst_dir / item.name, counts)
            else:
                how = _link_or_copy(item, dst_dir / item.name)
                counts[how] = counts.get(how, 0) + 1
        total_bytes = 0
        weight_map: dict[str, str] = {}
        for shard_path, names in reader.by_shard():
            layout = []
            for name in names:
                code = output_code(reader.dtype_code(name), name, dtype, keep_fp32)
                layout.append((name, code, reader.shape(name)))
            from engine.lora.files import read_safetensors_header

            shard_meta = read_safetensors_header(shard_path)[0].get("__metadata__") or {"format": "pt"}
            with shards.ShardWriter(dst_dir / shard_path.name, layout, shard_meta) as writer:
                for (name, code, _shape) in layout:
                    w0 = reader.get(name)
                    merged = merge(component, name, w0)
                    out = w0 if merged is None else merged
                    if merged is not None:
                        changed += 1
                    want = shards.torch_dtype(code)
                    if out.dtype != want:
                        out = out.to(want)
                    writer.write(name, out)
                    del w0, out, merged
                    done_total[0] += 1
                    if progress:
                        progress(done_total[0], done_total[1], f"{component}.{name}")
            total_bytes += (dst_dir / shard_path.name).stat().st_size
            for name in names:
                weight_map[name] = shard_path.name
        index = sorted(src_dir.glob("*.safetensors.index.json"))
        if index:
            data = json.loads(index[0].read_text())
            data.setdefault("metadata", {})["total_size"] = sum(
                _nbytes(reader, n, dtype, keep_fp32) for n in reader.keys()
            )
            data["weight_map"] = weight_map
            (dst_dir / index[0].name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    del torch
    return changed


def _nbytes(reader: shards.TensorReader, name: str, dtype, keep_fp32=None) -> int:
    code = output_code(reader.dtype_code(name), name, dtype, keep_fp32)
    n = shards._itemsize(code)
    for dim in reader.shape(name):
        n *= dim
    return n


def rewrite_model(
    model_dir: Path,
    out_dir: Path,
    merge: MergeFn,
    touched: set[str],
    *,
    dtype: str | None = None,
    keep_fp32: Callable[[str], bool] | None = None,
    marker: dict | None = None,
    progress: Progress | None = None,
) -> dict:
    """Write a copy of `model_dir` to `out_dir` with `merge` applied to the components in `touched`.

    `touched` names the expert components the stack changes; with `dtype` every expert component
    is rewritten (cast), otherwise untouched ones are linked. Returns a JSON-able summary.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_output(model_dir, out_dir)
    components = shards.expert_components(model_dir)
    target_dtype = shards.torch_dtype(dtype) if dtype else None
    rewrite = [c for c in components if c in touched or target_dtype is not None]
    started = time.monotonic()

    total = 0
    for c in rewrite:
        total += len(shards.component_files(model_dir / c))
    done_total = [0, total]
    counts: dict[str, int] = {}
    changed: dict[str, int] = {}

    try:
        with atomic_path(out_dir, directory=True) as tmp:
            for item in sorted(model_dir.iterdir()):
                if item.name in rewrite:
                    changed[item.name] = _rewrite_component(item, tmp / item.name, item.name, merge, target_dtype,
                                                            progress, done_total, counts, keep_fp32)
                elif item.is_dir():
                    _mirror(item, tmp / item.name, counts)
                else:
                    how = _link_or_copy(item, tmp / item.name)
                    counts[how] = counts.get(how, 0) + 1
            if marker is not None:
                (tmp / MERGE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if out_dir.exists():
                out_dir.rmdir()  # check_output allowed only an empty folder
    except OSError as e:  # atomic_path removed the partial folder
        if e.errno == errno.ENOSPC:
            raise RequestError(f"disk full while writing {out_dir}; nothing was left behind, free space and retry") from None
        raise RequestError(f"could not write {out_dir}: {e}; nothing was left behind") from None
    return {
        "out": str(out_dir),
        "source": str(model_dir),
        "dtype": dtype,
        "rewritten": rewrite,
        "changed_tensors": changed,
        "files_linked": counts.get("linked", 0),
        "files_copied": counts.get("copied", 0),
        "seconds": round(time.monotonic() - started, 2),
    }

