"""Reading LoRA files: safetensors only (pickle on explicit opt-in), metadata, sha256 and damage checks."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.lora.errors import LoraFormatError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_HASH_CHUNK_BYTES = 1 << 20
MAX_HEADER_BYTES = 32 << 20  # real LoRA headers are KBs to a few MBs (kohya tag metadata); past this, not a LoRA
MAX_TENSORS = 200_000
MAX_DIM = 1 << 31
MAX_NDIM = 8
# LoRA roles by key suffix, for the shape checks every reader runs before the formats see a tensor
_LOWRANK_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight",
                     ".lora_down.weight", ".lora_up.weight", ".lora.down.weight", ".lora.up.weight")
_DIFF_SUFFIXES = (".diff", ".diff_b", ".diff_m", ".lora_B.bias")


@dataclass
class LoraFile:
    """A LoRA file's tensors as stored (keys untouched), its metadata and identity."""

    path: Path
    sha256: str
    size_bytes: int
    tensors: dict[str, Any]  # key -> torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)
    container: str = "safetensors"  # or "pickle"


def _not_regular(path: Path, mode: int) -> LoraFormatError:
    kind = ("a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file")
    return LoraFormatError(f"{path.name} is {kind}, not a LoRA file; only regular .safetensors files are read")


def check_regular(path: Path) -> os.stat_result:
    """stat() of a regular file (following symlinks); LoraFormatError for devices, FIFOs, sockets, folders."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LoraFormatError(f"LoRA file {path} not found; check the path or rescan the LoRA folder") from None
    except OSError as e:
        raise LoraFormatError(f"{path.name} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    return st


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path` if it is a regular file (a symlink to one is fine).

    Devices, FIFOs and sockets are refused before anything is read: a symlink to /dev/zero would
    never end, and opening a FIFO would block (O_NONBLOCK makes the open itself return at once; the
    file is checked again on the descriptor in case it was swapped in between).
    """
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise LoraFormatError(f"LoRA file {path} not found; check the path or rescan the LoRA folder") from None
    except OSError as e:
        raise LoraFormatError(f"{path.name} cannot be opened: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    return fd


def file_sha256(path: Path, max_bytes: int | None = None) -> str | None:
    """sha256 of a regular file; None when `max_bytes` is given and the file is larger (not read at all)."""
    fd = open_regular(path)
    try:
        if max_bytes is not None and os.fstat(fd).st_size > max_bytes:
            return None
        h = hashlib.sha256()
        with os.fdopen(fd, "rb", closefd=False) as f:
            while chunk := f.read(_HASH_CHUNK_BYTES):
                h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


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
    """The JSON header of a safetensors file (checked entry by entry) and the offset where its data starts.

    Raises LoraFormatError for anything that is not a complete, well-formed safetensors file, so that an
    empty, truncated, foreign or hand-crafted file gets one line naming it instead of a library traceback.
    Reads at most 8 + MAX_HEADER_BYTES bytes.
    """
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise LoraFormatError(f"{path.name} is empty (0 bytes); download or copy it again")
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise LoraFormatError(f"{path.name} is not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES:
            raise LoraFormatError(f"{path.name} is not a safetensors file (no valid header); use a .safetensors LoRA")
        if 8 + n > size:
            raise LoraFormatError(f"{path.name} is truncated: its header needs {8 + n} bytes but the file has {size}; download it again")
        raw = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    if len(raw) != n:
        raise LoraFormatError(f"{path.name} changed while it was read; try again")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraFormatError(f"{path.name} is not a safetensors file (header is not JSON); use a .safetensors LoRA") from None
    except RecursionError:
        raise LoraFormatError(f"{path.name} is not a safetensors file (its header is nested too deeply)") from None
    if not isinstance(header, dict):
        raise LoraFormatError(f"{path.name} is not a safetensors file (header is not an object)")
    check_header(header, path, size - 8 - n)
    return header, 8 + n


def check_header(header: dict[str, Any], path: Path, data_bytes: int) -> None:
    """Every entry of a safetensors header well formed: metadata text to text, known dtype, shape of
    non-negative ints, data_offsets inside the data and exactly the shape's size."""
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict)
                             or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise LoraFormatError(f"{path.name}: its __metadata__ must map text to text; the file is damaged")
    if len(header) > MAX_TENSORS:
        raise LoraFormatError(f"{path.name} has {len(header)} header entries; a LoRA has far fewer")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise LoraFormatError(f"{path.name}: header entry {key[:120]!r} is not a tensor description; the file is damaged")
        dtype = info.get("dtype")
        size = _ST_ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
        if size is None:
            raise LoraFormatError(f"{path.name}: tensor {key[:120]} has unsupported dtype {str(dtype)[:40]}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):
            raise LoraFormatError(f"{path.name}: tensor {key[:120]} has an invalid shape {str(shape)[:80]}; the file is damaged")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise LoraFormatError(f"{path.name}: tensor {key[:120]!r} has no valid data_offsets; the file is damaged")
        if offsets[1] > data_bytes:
            raise LoraFormatError(
                f"{path.name} is truncated: tensor {key[:120]} ends at data byte {offsets[1]} but the file holds "
                f"{data_bytes}; download it again")
        numel = 1
        for d in shape:
            numel *= d
        if numel * size != offsets[1] - offsets[0]:
            raise LoraFormatError(
                f"{path.name}: tensor {key[:120]} has shape {shape} ({numel * size} bytes) but {offsets[1] - offsets[0]} "
                "bytes of data; the file is damaged")


def check_lora_tensor(path: Path, key: str, shape: tuple[int, ...], floating: bool) -> None:
    """A LoRA role's tensor shape: pairs are at least 2-D with no empty dimension (rank 0 is no LoRA), an
    alpha is one number, a diff holds something; LoRA weights are floating point."""
    name = path.name
    if key.endswith(_LOWRANK_SUFFIXES):
        if len(shape) < 2 or 0 in shape:
            raise LoraFormatError(f"{name}: tensor {key} has shape {list(shape)}; a LoRA down/up matrix needs at least "
                                  "2 dimensions and rank >= 1; the file is damaged")
    elif key.endswith(".alpha"):
        if len(shape) > 1 or (shape and shape[0] != 1):
            raise LoraFormatError(f"{name}: alpha {key} has shape {list(shape)}; an alpha is one number; the file is damaged")
    elif key.endswith(_DIFF_SUFFIXES):
        if 0 in shape:
            raise LoraFormatError(f"{name}: tensor {key} is empty (shape {list(shape)}); the file is damaged")
    else:
        return
    if not floating:
        raise LoraFormatError(f"{name}: tensor {key} is not floating point; LoRA weights are float16/bfloat16/float32")


def read_lora_file(path: str | Path, *, allow_pickle: bool = False, sha256: str | None = None) -> LoraFile:
    """Load every tensor of a LoRA file into CPU memory and check it is finite."""
    import torch

    path = Path(path)
    size = check_regular(path).st_size
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
        check_lora_tensor(path, key, tuple(t.shape), t.is_floating_point())
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
    fd = open_regular(path)
    try:
        for key, info, dtype in _tensor_entries(header, path):
            start, end = (int(x) for x in info["data_offsets"])
            t = torch.empty(tuple(info.get("shape", [])), dtype=dtype)
            if t.numel() * t.element_size() != end - start:
                raise LoraFormatError(f"{path.name}: tensor {key} size does not match its shape; the file is damaged")
            try:
                pread_into(fd, t, data_start + start)
            except OSError:
                raise LoraFormatError(f"{path.name} became shorter while it was read (tensor {key}); try again") from None
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

    Enough to inspect a LoRA and compute its coverage without reading its weights: reads the header and
    the alphas only.
    """
    import torch

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFormatError(f"{path.name} is a pickle file ({path.suffix}); only .safetensors LoRAs can be inspected without loading them")
    header, data_start = read_safetensors_header(path)
    tensors: dict[str, Any] = {}
    alpha_keys = []
    for key, info, dtype in _tensor_entries(header, path):
        check_lora_tensor(path, key, tuple(info["shape"]), dtype.is_floating_point)
        tensors[key] = torch.empty(info["shape"], dtype=dtype, device="meta")
        if key.endswith(".alpha"):
            alpha_keys.append(key)
    if not tensors:
        raise LoraFormatError(f"{path.name} holds no tensors; it is not a LoRA")
    if alpha_keys:
        fd = open_regular(path)
        try:
            for key in alpha_keys:
                t = torch.empty(tensors[key].shape, dtype=tensors[key].dtype)
                try:
                    pread_into(fd, t, data_start + header[key]["data_offsets"][0])
                except OSError:
                    raise LoraFormatError(f"{path.name} became shorter while it was read; try again") from None
                if not bool(torch.isfinite(t).all()):
                    raise LoraFormatError(f"{path.name}: alpha {key} is NaN or Inf; the file is damaged")
                tensors[key] = t
        finally:
            os.close(fd)
    digest = file_sha256(path) if sha256 is None else sha256
    return LoraFile(path, digest, path.stat().st_size, tensors, dict(header.get("__metadata__") or {}))


def _st_dtypes():
    from engine.dtypes import DTYPES, torch_dtype

    table = {d.st_code: torch_dtype(d.name) for d in DTYPES}
    return {code: dtype for code, dtype in table.items() if dtype is not None}


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class _LazyDtypes(dict):
    """safetensors dtype names -> torch dtypes, filled on first use so importing this module stays torch-free."""

    def get(self, key, default=None):
        if not self:
            self.update(_st_dtypes())
        return super().get(key, default)


_ST_DTYPES = _LazyDtypes()
