"""Tensor names, dtypes and shapes of a .safetensors or .gguf file, read from its header only (no weights)."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from engine.types import RequestError

WEIGHT_SUFFIXES = (".safetensors", ".gguf")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors code (BF16, F8_E4M3, ...) or a GGUF type name (Q4_K, F32, BF16, ...)
    shape: tuple[int, ...]


@dataclass
class FileHeader:
    path: Path
    format: str  # "safetensors" or "gguf"
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.tensors)


def read_header(path: str | Path) -> FileHeader:
    """Header of one weight file; RequestError naming the file when it is not a readable one."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return _gguf_header(path)
    if path.suffix.lower() != ".safetensors":
        raise RequestError(f"{path.name}: only .safetensors and .gguf model files are read (pickle files are not)")
    from engine.lora.errors import LoraFormatError
    from engine.lora.files import read_safetensors_header

    try:
        header, _ = read_safetensors_header(path)
    except LoraFormatError as e:
        raise RequestError(str(e).replace("LoRA", "model file")) from None
    meta = header.pop("__metadata__", None) or {}
    tensors = {k: TensorInfo(v["dtype"], tuple(v["shape"])) for k, v in header.items()}
    return FileHeader(path, "safetensors", tensors, {str(k): str(v) for k, v in meta.items()})


def check_complete(path: str | Path) -> None:
    """RequestError naming a .safetensors weight file that is missing, cut short, or not a safetensors file.

    Reads only the header: the file must be exactly 8 + header + the data its last tensor ends at, as the
    safetensors loader requires; a download that stopped early is caught here with both sizes, before a
    loader turns it into a library error.
    """
    import os
    import stat

    from engine.lora.files import MAX_HEADER_BYTES

    path = Path(path)
    fix = "download it again"
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise RequestError(f"{path} is not a regular file; a model file must be a .safetensors file")
            size = st.st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 2 <= n <= MAX_HEADER_BYTES:
                raise RequestError(f"{path} is not a safetensors file (no valid header, {size} bytes); {fix}")
            if 8 + n > size:
                raise RequestError(f"{path} is truncated or not a safetensors file (expected at least {8 + n} "
                                   f"bytes for its header, found {size}); {fix}")
            raw = f.read(n)
    except FileNotFoundError:
        raise RequestError(f"{path} is missing; {fix}") from None
    except OSError as e:
        raise RequestError(f"{path} could not be read ({e.strerror or e}); check the file or {fix}") from None
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        raise RequestError(f"{path} is not a safetensors file (its header is damaged); {fix}") from None
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        how = "truncated" if size < expected else "damaged"
        raise RequestError(f"{path} is {how} or not a safetensors file (expected {expected} bytes, found {size}); "
                           f"{fix}")


def _gguf_header(path: Path) -> FileHeader:
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - gguf is in requirements.txt
        raise RequestError(f"{path.name}: reading GGUF needs the `gguf` package; run scripts/setup.sh") from None
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, KeyError) as e:
        raise RequestError(f"{path.name} is not a readable GGUF file ({e}); download it again") from None
    tensors = {}
    for t in reader.tensors:
        # GGUF lists dimensions innermost first; torch order is the reverse.
        tensors[t.name] = TensorInfo(t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())))
    meta = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF.") or not fld.types:
            continue
        try:
            value = fld.contents()
        except (ValueError, IndexError, TypeError):
            continue
        if isinstance(value, (str, int, float, bool)):
            meta[name] = str(value)
    return FileHeader(path, "gguf", tensors, meta)


def embedded_config(header: FileHeader) -> dict | None:
    """The diffusers/transformers config a file carries in its metadata (`wanstack_config`), if any.

    WanStack's own tiny test files carry theirs, since a demo's sizes (heads, latents mean/std) cannot be
    read from the weights; real files get the shipped config of their detected type.
    """
    raw = header.metadata.get("wanstack_config")
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
