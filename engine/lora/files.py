"""Reading LoRA files: safetensors only (pickle on explicit opt-in), metadata, sha256 and damage checks."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.lora.errors import LoraFormatError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_HASH_CHUNK_BYTES = 1 << 20


@dataclass
class LoraFile:
    """A LoRA file's tensors as stored (keys untouched), its metadata and identity."""

    path: Path
    sha256: str
    size_bytes: int
    tensors: dict[str, Any]  # key -> torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)
    container: str = "safetensors"  # or "pickle"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _tensor_entries(header: dict, path: Path):
    """(key, header entry, torch dtype) for every tensor of a safetensors header; unknown dtypes refused."""
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise LoraFormatError(f"{path.name}: tensor {key} has unsupported dtype {info.get('dtype')}")
        yield key, info, dtype


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts.

    Raises LoraFormatError for anything that is not a complete safetensors file, so that an empty,
    truncated or foreign file gets one clear line instead of a library traceback.
    """
    size = path.stat().st_size
    if size == 0:
        raise LoraFormatError(f"{path.name} is empty (0 bytes); download or copy it again")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraFormatError(f"{path.name} is not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > 100_000_000:
            raise LoraFormatError(f"{path.name} is not a safetensors file (no valid header); use a .safetensors LoRA")
        if 8 + n > size:
            raise LoraFormatError(f"{path.name} is truncated: its header needs {8 + n} bytes but the file has {size}; download it again")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraFormatError(f"{path.name} is not a safetensors file (header is not JSON); use a .safetensors LoRA") from None
    if not isinstance(header, dict):
        raise LoraFormatError(f"{path.name} is not a safetensors file (header is not an object)")
    data_bytes = size - 8 - n
    needed = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            needed = max(needed, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise LoraFormatError(f"{path.name}: tensor {key!r} has no valid data_offsets; the file is damaged") from None
    if needed > data_bytes:
        raise LoraFormatError(
            f"{path.name} is truncated: its tensors need {needed + 8 + n} bytes but the file has {size}; download it again"
        )
    return header, 8 + n


def read_lora_file(path: str | Path, *, allow_pickle: bool = False, sha256: str | None = None) -> LoraFile:
    """Load every tensor of a LoRA file into CPU memory and check it is finite."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"LoRA file {path} not found; check the path or rescan the LoRA folder")
    size = path.stat().st_size
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraFormatError(
                f"{path.name} is a pickle file ({path.suffix}), which can run code when loaded; "
                "convert it to .safetensors, or turn on 'allow pickle LoRAs' to load it with torch.load(weights_only=True)"
            )
        if size == 0:
            raise LoraFormatError(f"{path.name} is empty (0 bytes); download or copy it again")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for foreign/damaged pickles; all mean "cannot read"
            raise LoraFormatError(f"{path.name} could not be read with torch.load(weights_only=True): {e}") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise LoraFormatError(f"{path.name} does not hold a dict of tensors")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        metadata: dict[str, str] = {}
        container = "pickle"
    else:
        header, data_start = read_safetensors_header(path)
        metadata = dict(header.get("__metadata__") or {})
        tensors = _read_tensors(path, header, data_start)
        container = "safetensors"
    if not tensors:
        raise LoraFormatError(f"{path.name} holds no tensors; it is not a LoRA")
    for key, t in tensors.items():
        if key.endswith(".alpha") and t.is_floating_point() and not bool(torch.isnan(t).any()):
            continue  # an infinite alpha is ai-toolkit's full-matrix LoKr saved in fp16 (issue 11: formats decides)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LoraFormatError(
                f"{path.name}: tensor {key} contains NaN or Inf values; the file is damaged or its training diverged"
            )
    digest = sha256 or file_sha256(path)
    return LoraFile(path, digest, size, tensors, metadata, container)


def pread_into(fd: int, out, offset: int) -> None:
    """Fill a contiguous CPU tensor from a file descriptor at `offset` (no mmap, no intermediate copy)."""
    import torch

    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    done, total = 0, len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at byte {offset + done}")
        done += n


def _read_tensors(path: Path, header: dict[str, Any], data_start: int) -> dict[str, Any]:
    """Every tensor of a checked safetensors file, each read straight into its own buffer.

    Reading with pread instead of safetensors' mmap keeps the process's resident memory at the
    size of the tensors themselves (mapped file pages would count too while the file is open).
    """
    import torch

    tensors: dict[str, Any] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for key, info, dtype in _tensor_entries(header, path):
            start, end = (int(x) for x in info["data_offsets"])
            t = torch.empty(tuple(info.get("shape", [])), dtype=dtype)
            if t.numel() * t.element_size() != end - start:
                raise LoraFormatError(f"{path.name}: tensor {key} size does not match its shape; the file is damaged")
            pread_into(fd, t, data_start + start)
            tensors[key] = t
    finally:
        os.close(fd)
    return tensors


def trigger_words(metadata: dict[str, str], limit: int = 20) -> list[str]:
    """Trigger words from kohya's ss_tag_frequency (most frequent first) or modelspec fields."""
    words: list[str] = []
    for key in ("modelspec.trigger_phrase", "ss_trigger_words", "trigger_words"):
        value = metadata.get(key)
        if value:
            words += [w.strip() for w in value.split(",") if w.strip()]
    raw = metadata.get("ss_tag_frequency")
    if raw:
        try:
            freq = json.loads(raw)
        except json.JSONDecodeError:
            freq = {}
        counts: dict[str, int] = {}
        if isinstance(freq, dict):
            for tags in freq.values():
                if isinstance(tags, dict):
                    for tag, n in tags.items():
                        if isinstance(n, (int, float)):
                            counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
        words += [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if t]
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)[:limit]


def metadata_summary(metadata: dict[str, str]) -> dict[str, Any]:
    """The fields a person wants to see: base model, training rank/alpha, title, trigger words."""
    out: dict[str, Any] = {"trigger_words": trigger_words(metadata)}
    for name, keys in {
        "base_model": ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name", "base_model"),
        "title": ("modelspec.title", "ss_output_name"),
        "training_rank": ("ss_network_dim",),
        "training_alpha": ("ss_network_alpha",),
    }.items():
        for k in keys:
            if metadata.get(k):
                out[name] = metadata[k]
                break
    peft = metadata.get("lora_adapter_metadata")
    if peft:
        try:
            cfg = json.loads(peft)
            out.setdefault("training_rank", cfg.get("r"))
            out.setdefault("training_alpha", cfg.get("lora_alpha"))
        except (json.JSONDecodeError, AttributeError):
            pass
    return out


def read_lora_shapes(path: str | Path, *, sha256: str | None = None) -> LoraFile:
    """A LoraFile whose tensors are meta tensors (shape and dtype only) except the small alpha scalars.

    Enough to inspect a LoRA and compute its coverage without reading its weights.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"LoRA file {path} not found; check the path or rescan the LoRA folder")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFormatError(f"{path.name} is a pickle file ({path.suffix}); only .safetensors LoRAs can be inspected without loading them")
    header, _ = read_safetensors_header(path)
    tensors: dict[str, Any] = {}
    alpha_keys = []
    for key, info, dtype in _tensor_entries(header, path):
        tensors[key] = torch.empty(info.get("shape", []), dtype=dtype, device="meta")
        if key.endswith(".alpha"):
            alpha_keys.append(key)
    if not tensors:
        raise LoraFormatError(f"{path.name} holds no tensors; it is not a LoRA")
    if alpha_keys:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in alpha_keys:
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise LoraFormatError(f"{path.name} is damaged and cannot be read as safetensors: {e}") from None
    digest = sha256 or file_sha256(path)
    return LoraFile(path, digest, path.stat().st_size, tensors, dict(header.get("__metadata__") or {}))


def _st_dtypes():
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
        if hasattr(torch, attr):
            table[name] = getattr(torch, attr)
    return table


class _LazyDtypes(dict):
    """safetensors dtype names -> torch dtypes, filled on first use so importing this module stays torch-free."""

    def get(self, key, default=None):
        if not self:
            self.update(_st_dtypes())
        return super().get(key, default)


_ST_DTYPES = _LazyDtypes()
