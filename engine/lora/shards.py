"""Tensor-by-tensor access to a diffusers model folder's safetensors shards, for the LoRA tools.

Reading uses pread into each tensor's own buffer (the LoRA engine's WeightSource), never a
memory map, so a tool holds one tensor at a time, never a whole model. `ShardWriter` writes a
safetensors file tensor by tensor: the header is known up front (names, dtypes, shapes), so
nothing has to be collected in memory first.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Iterator

from engine.types import RequestError

log = logging.getLogger(__name__)

# Expert components of a diffusers Wan folder, in expert order (high-noise first for A14B).
EXPERT_COMPONENTS = ("transformer", "transformer_2")

def torch_dtype(name: str):
    """`bf16` / `bfloat16` / `BF16` -> torch.bfloat16 (engine/dtypes.py is the table)."""
    from engine.dtypes import CAST_CHOICES, torch_dtype as lookup

    value = lookup(name)
    if value is None:
        raise RequestError(f"dtype {name!r} is not one of {', '.join(CAST_CHOICES)}")
    return value


def st_dtype_code(dtype) -> str:
    """torch.bfloat16 (or 'bf16') -> 'BF16' (the safetensors header code)."""
    from engine.dtypes import lookup

    try:
        return lookup(dtype if isinstance(dtype, str) else str(dtype)).st_code
    except RequestError:
        raise RequestError(f"dtype {dtype} cannot be stored in safetensors") from None


def component_files(component_dir: Path) -> dict[str, Path]:
    """Tensor name -> shard file of one component folder (single file or sharded with an index)."""
    component_dir = Path(component_dir)
    indexes = sorted(component_dir.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise RequestError(f"{indexes[0]} is not a readable safetensors index ({e}); re-download the model") from None
        files = {name: component_dir / shard for name, shard in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise RequestError(f"{indexes[0]} lists missing shard(s) {missing[:3]}; re-download the model")
        return files
    shards = sorted(component_dir.glob("*.safetensors"))
    if not shards:
        raise RequestError(f"{component_dir} holds no .safetensors weights; point at a diffusers-layout model folder")
    from engine.lora.files import read_safetensors_header

    files: dict[str, Path] = {}
    for shard in shards:
        header, _ = read_safetensors_header(shard)
        for name in header:
            if name != "__metadata__":
                files[name] = shard
    return files


def expert_components(model_dir: Path) -> list[str]:
    """The transformer component folders present in a diffusers model folder, in expert order."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RequestError(f"model folder {model_dir} does not exist; pass a diffusers-layout Wan model folder")
    found = [c for c in EXPERT_COMPONENTS if (model_dir / c).is_dir() and any((model_dir / c).glob("*.safetensors"))]
    if not found or found[0] != "transformer":
        raise RequestError(f"{model_dir} has no transformer/ folder with .safetensors weights; is it a diffusers-layout Wan model?")
    return found


def component_config(component_dir: Path) -> dict:
    """The component's config.json without the bookkeeping fields that differ between equal models."""
    path = Path(component_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RequestError(f"cannot read {path} ({e}); the model folder is incomplete") from None
    return {k: v for k, v in config.items() if not k.startswith("_")}


class TensorReader:
    """Read one component's tensors by name, one at a time.

    Reads go through the LoRA engine's WeightSource (pread straight into the tensor's buffer): with
    safe_open's memory map, every page read would stay in the process's resident set until the
    file is closed, so a streamed pass over a model would still peak at the model's size.
    """

    def __init__(self, component_dir: Path):
        from engine.lora.merge import WeightSource

        self.component_dir = Path(component_dir)
        self.files = component_files(self.component_dir)
        self._source = WeightSource(self.component_dir)
        missing = sorted(set(self.files) - set(self._source.index))
        if missing:
            raise RequestError(f"{self.component_dir}: tensor {missing[0]} is listed but not in any .safetensors file")

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between reads; kept so readers can be used as context managers."""

    def keys(self) -> list[str]:
        return sorted(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._source.index[name][2])

    def dtype_code(self, name: str) -> str:
        return self._source.index[name][1]

    def get(self, name: str):
        return self._source.read(name, torch_dtype(self.dtype_code(name)))

    def by_shard(self) -> Iterator[tuple[Path, list[str]]]:
        """(shard path, names in that shard) in file order, so a rewrite can keep the same sharding."""
        shards: dict[Path, list[str]] = {}
        for name, path in sorted(self.files.items()):
            shards.setdefault(path, []).append(name)
        yield from sorted(shards.items())


class ShardWriter:
    """Write a safetensors file tensor by tensor.

    The header (names, dtypes, shapes, offsets) is fixed at construction; `write(name, tensor)`
    must then be called once per name in the declared order. Peak memory is one tensor.
    """

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._layout = layout
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, code, shape in layout:
            nbytes = _itemsize(code)
            for dim in shape:
                nbytes *= dim
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, tensor) -> None:
        expected_name, code, shape = self._layout[self._next]
        if name != expected_name or tuple(tensor.shape) != tuple(shape) or st_dtype_code(tensor.dtype) != code:
            raise ValueError(f"ShardWriter expected {expected_name} {code} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        import torch

        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(flat.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            if self._next != len(self._layout):
                raise ValueError(f"{self.path}: wrote {self._next} of {len(self._layout)} tensors")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self._file.close()
            return
        self.close()


def _itemsize(code: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(code, 1)


def is_inside(path: Path, folder: Path) -> bool:
    """True when `path` is `folder` itself or anywhere below it (symlinks resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents
