"""What a weight file is, from its header alone: component kind, Wan model type, storage.

Transformer types come from shapes (width, in_channels 16/36/48, the Wan2.1 I2V image branch) and, for the
14B T2V/I2V shapes that Wan2.1 and the Wan2.2 experts share, from the file name (`high_noise`/`low_noise`).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from engine.models.catalog import DEMO_WIDTH
from engine.models.headers import FileHeader, read_header
from engine.models.keys import MARKER, is_aux, split_prefix

TRANSFORMER, TEXT_ENCODER, VAE, CLIP_VISION, LORA, UNKNOWN = (
    "transformer", "text_encoder", "vae", "clip_vision", "lora", "unknown")
_REAL_WIDTHS = {1536, 3072, 5120}
_DEMO_WIDTHS = set(DEMO_WIDTH.values())
STORAGE_LABELS = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8_e4m3fn": "fp8", "fp8_scaled": "fp8 scaled"}
_ST_STORAGE = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F8_E4M3": "fp8_e4m3fn"}
@dataclass(frozen=True)
class FileKind:
    path: str
    kind: str  # transformer / text_encoder / vae / clip_vision / lora / unknown
    storage: str = ""  # fp32, bf16, fp16, fp8_e4m3fn, fp8_scaled, gguf-Q4_K, ...
    arch: str | None = None  # transformer: real model type (or the pair type for an expert); vae: "wan2.1"/"wan2.2"
    expert: str | None = None  # "high_noise" / "low_noise" from the file name
    demo: bool = False
    reason: str = ""  # why the file cannot be used (kind known, content not supported)
    text_dim: int = 0  # transformer: the text width it expects; text encoder: its d_model


def expert_from_name(name: str) -> str | None:
    low = name.lower()
    if re.search(r"high[_\- ]?noise|(^|[_\-.])high([_\-.]|$)|_hn[_.]", low):
        return "high_noise"
    if re.search(r"low[_\- ]?noise|(^|[_\-.])low([_\-.]|$)|_ln[_.]", low):
        return "low_noise"
    return None


def storage_of(header: FileHeader, params: list[str]) -> str:
    """Storage of the 2-D block weights (what dominates the bytes)."""
    big = [n for n in params if len(header.tensors[n].shape) == 2
           and (n.startswith(("blocks.", "encoder.block.")) or ".blocks." in n)]
    counts = Counter(header.tensors[n].dtype for n in (big or params))
    if not counts:
        return "unknown"
    code = counts.most_common(1)[0][0]
    if header.format == "gguf":
        return f"gguf-{code}"
    storage = _ST_STORAGE.get(code, code.lower())
    if storage == "fp8_e4m3fn" and any(n.endswith((".scale_weight", ".weight_scale")) for n in header.tensors):
        storage = "fp8_scaled"
    return storage


def unsupported_quantization(header: FileHeader) -> str:
    """Why a safetensors file's quantized weights cannot be read as fp8 with per-tensor scales, or "".

    ComfyUI's mixed-precision files may hold int8, nvfp4 or mxfp8 layers (integer or byte containers with per-row
    or per-block `weight_scale`s); read as plain tensors they would load silently wrong weights."""
    if header.format != "safetensors":
        return ""
    for name, info in header.tensors.items():
        if name.endswith(".weight") and len(info.shape) == 2 and info.dtype in ("I8", "U8", "I16", "I32", "I64"):
            return (f"{header.path.name} stores {name} as {info.dtype} (an int8 or 4-bit quantized layout); WanStack "
                    "reads bf16/fp16/fp32, fp8 with per-tensor scales and GGUF: use one of those versions")
    for name, info in header.tensors.items():
        if name.endswith((".weight_scale", ".scale_weight")) and math.prod(info.shape) != 1:
            return (f"{header.path.name} has per-block or per-row weight scales ({name}, shape {list(info.shape)}); "
                    "WanStack reads fp8 with per-tensor scales: use the fp8_scaled, bf16/fp16 or GGUF version")
    return ""


def file_storage(path: str | Path) -> str:
    """Storage of a single-file component (fp8_scaled, bf16, gguf-Q4_K, ...) from its header alone; "" for a
    folder or a file that cannot be read (its loader will say why)."""
    from engine.types import RequestError

    path = Path(path)
    if not path.is_file():
        return ""
    try:
        header = read_header(path)
    except (RequestError, OSError):
        return ""
    return storage_of(header, [n for n in header.tensors if not is_aux(n)])


def _blocks(names: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    return max(found) + 1 if found else 0


def classify_file(path: str | Path, header: FileHeader | None = None) -> FileKind:
    """Kind, type and storage of one .safetensors/.gguf file; never raises for a bad file (reason instead)."""
    from engine.types import RequestError

    path = Path(path)
    try:
        header = header or read_header(path)
    except RequestError as e:
        return FileKind(str(path), UNKNOWN, reason=str(e))
    names = header.names()
    demo = "wanstack_config" in header.metadata
    if any(".lora_down." in n or ".lora_A." in n or n.endswith((".diff", ".diff_b")) or n.startswith("lora_unet_")
           for n in names[:2000]):
        return FileKind(str(path), LORA, demo=demo)
    if any(n.endswith(("._data", ".weight._scale")) for n in names):
        return FileKind(str(path), TRANSFORMER, "quanto", demo=demo,
                        reason=f"{path.name} is quanto int8 (Wan2GP); use the bf16/fp16 or fp8 version of this file")
    why = unsupported_quantization(header)
    if why:
        return FileKind(str(path), TRANSFORMER if any("blocks." in n for n in names[:50]) else UNKNOWN, "unsupported",
                        demo=demo, reason=why)
    prefix = split_prefix(names)
    bare = [n[len(prefix):] for n in names if n.startswith(prefix)]
    params = [n for n in names if not is_aux(n)]
    if "patch_embedding.weight" in bare or "condition_embedder.time_proj.weight" in bare:
        return _transformer(path, header, prefix, bare, params, demo)
    if "decoder.middle.0.residual.0.gamma" in names or "decoder.mid_block.resnets.0.norm1.gamma" in names:
        z = header.tensors.get("conv1.weight") or header.tensors.get("quant_conv.weight")
        z_dim = z.shape[0] // 2 if z else 0
        arch = "wan2.2" if z_dim == 48 else "wan2.1" if z_dim == 16 else None
        return FileKind(str(path), VAE, storage_of(header, params), arch, demo=demo,
                        reason="" if arch else f"{path.name}: VAE with {z_dim} latent channels is not a Wan VAE")
    t5 = any(n.startswith("encoder.block.0.layer.0.SelfAttention.") for n in names) or "token_embedding.weight" in names
    if t5:
        umt5 = ("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in names
                or "blocks.1.pos_embedding.embedding.weight" in names)
        reason = "" if umt5 else f"{path.name} is a T5 encoder but not umt5-xxl (Wan uses umt5-xxl)"
        emb = header.tensors.get("shared.weight") or header.tensors.get("token_embedding.weight")
        return FileKind(str(path), TEXT_ENCODER, storage_of(header, params), "umt5" if umt5 else None, demo=demo,
                        reason=reason, text_dim=emb.shape[1] if emb else 0)
    if any(n.startswith(("vision_model.", "visual.")) for n in names):
        return FileKind(str(path), CLIP_VISION, storage_of(header, params), demo=demo)
    return FileKind(str(path), UNKNOWN, reason=f"{path.name}: not a Wan transformer, VAE, umt5 text encoder or LoRA")


def _transformer(path: Path, header: FileHeader, prefix: str, bare: list[str], params: list[str], demo: bool) -> FileKind:
    t = {n[len(prefix):]: header.tensors[n] for n in params if n.startswith(prefix)}
    pe = t.get("patch_embedding.weight")
    width, in_ch = (pe.shape[0], pe.shape[1]) if pe and len(pe.shape) >= 2 else (0, 0)
    storage = storage_of(header, params)
    if header.format == "gguf" and header.metadata.get("general.architecture", "wan") != "wan":
        return FileKind(str(path), TRANSFORMER, storage, reason=f"{path.name}: GGUF architecture "
                        f"{header.metadata.get('general.architecture')!r} is not wan")
    if any(n.startswith(("vace_blocks.", "motion_encoder.", "face_adapter.")) for n in t):
        return FileKind(str(path), TRANSFORMER, storage, reason=f"{path.name} is a Wan VACE/Animate model; WanStack runs T2V/I2V/TI2V")
    image = any(n.startswith("img_emb.") or ".k_img." in n or "image_embedder" in n or "add_k_proj" in n for n in t)
    expert = expert_from_name(path.name)
    if width not in _REAL_WIDTHS | _DEMO_WIDTHS:
        return FileKind(str(path), TRANSFORMER, storage, reason=f"{path.name}: transformer width {width} is no Wan size")
    real = width in _REAL_WIDTHS
    family = width if real else {v: k for k, v in DEMO_WIDTH.items()}[width]
    if in_ch == 48:
        arch = "wan2.2-ti2v-5b"
    elif in_ch == 36:
        arch = "wan2.1-i2v-14b" if image else "wan2.2-i2v-a14b"
    elif in_ch == 16:
        arch = "wan2.1-t2v-1.3b" if family == 1536 else ("wan2.2-t2v-a14b" if expert else "wan2.1-t2v-14b")
    else:
        return FileKind(str(path), TRANSFORMER, storage, reason=f"{path.name}: in_channels {in_ch} matches no Wan model")
    from engine.models.catalog import CATALOG

    if family != CATALOG[arch].memory.width:
        return FileKind(str(path), TRANSFORMER, storage, arch, expert, demo,
                        reason=f"{path.name}: width {width} does not fit {arch}")
    if arch == "wan2.2-i2v-a14b" and not expert:
        expert = None
    if storage.startswith("gguf-") and storage[5:] not in _GGUF_OK:
        return FileKind(str(path), TRANSFORMER, storage, arch, expert, demo,
                        reason=f"{path.name}: GGUF type {storage[5:]} is not supported (use Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0 ...)")
    te = t.get("text_embedding.0.weight") or t.get("condition_embedder.text_embedder.linear_1.weight")
    return FileKind(str(path), TRANSFORMER, storage, arch, expert, demo or not real, text_dim=te.shape[1] if te else 0)


_GGUF_OK = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "BF16", "F16", "F32"}


def storage_label(storage: str, experts: int) -> str:
    """What the model picker shows: "fp8 scaled · 2 experts", "GGUF Q4_K", "bf16"."""
    label = STORAGE_LABELS.get(storage) or (f"GGUF {storage[5:]}" if storage.startswith("gguf-") else storage)
    return f"{label} · {experts} experts" if experts > 1 else label


__all__ = ["FileKind", "classify_file", "expert_from_name", "storage_label", "MARKER"]
