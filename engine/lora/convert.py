"""`lora convert`: rename a LoRA's keys between diffusers names and original Wan / ComfyUI names.

Only names change: every tensor is written back bit for bit, `.alpha` stays as it is, and the
file's metadata is kept. Module names go through engine.lora.names (the one Wan <-> diffusers
table); this module only handles the key prefix (which expert) and the suffix (lora_A/B vs
lora_down/up).

    diffusers  transformer.blocks.0.attn1.to_q.lora_A.weight
    comfy      diffusion_model.blocks.0.self_attn.q.lora_down.weight
    two experts: lora_transformer / lora_transformer_2  <->  diffusion_model / diffusion_model_2
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from engine.lora.names import diffusers_to_wan, wan_to_diffusers
from engine.types import RequestError

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "comfy")

# Key prefix -> (naming family, expert index). Index 0 is `transformer` (high-noise on A14B).
PREFIXES: dict[str, tuple[str, int]] = {
    "lora_transformer_2": ("diffusers", 1),
    "lora_transformer": ("diffusers", 0),
    "transformer_2": ("diffusers", 1),
    "transformer": ("diffusers", 0),
    "diffusion_model_2": ("comfy", 1),
    "diffusion_model": ("comfy", 0),
}

# Key suffixes in each naming; everything not listed keeps its suffix (alpha, diff, diff_b, diff_m, ...).
_TO_COMFY_SUFFIX = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_TO_DIFFUSERS_SUFFIX = {v: k for k, v in _TO_COMFY_SUFFIX.items()}
SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight", "lora_B.bias",
            "alpha", "diff", "diff_b", "diff_m")


@dataclass(frozen=True)
class ParsedKey:
    prefix: str  # "" when the file has no prefix (some LightX2V files)
    module: str  # e.g. blocks.0.attn1.to_q
    suffix: str  # e.g. lora_A.weight


def output_prefix(fmt: str, expert_index: int, two_experts: bool) -> str:
    """The key prefix this tool writes: one expert -> `transformer` / `diffusion_model`;
    a file with both experts -> `lora_transformer`+`lora_transformer_2` / `diffusion_model`+`diffusion_model_2`."""
    if fmt == "comfy":
        return "diffusion_model_2" if expert_index else "diffusion_model"
    if two_experts:
        return "lora_transformer_2" if expert_index else "lora_transformer"
    return "transformer_2" if expert_index else "transformer"


def parse_key(key: str) -> ParsedKey:
    """Split a key into prefix, module and suffix; raises RequestError for keys this tool cannot name."""
    suffix = next((s for s in SUFFIXES if key.endswith("." + s)), None)
    if suffix is None:
        raise RequestError(
            f"key {key!r} has no LoRA suffix ({', '.join(SUFFIXES)}); convert handles diffusers and Wan/ComfyUI LoRA files"
        )
    head = key[: -len(suffix) - 1]
    prefix, _, rest = head.partition(".")
    if prefix in PREFIXES and rest:
        return ParsedKey(prefix, rest, suffix)
    if head.startswith("blocks.") or wan_to_diffusers(head) or diffusers_to_wan(head):
        return ParsedKey("", head, suffix)
    raise RequestError(
        f"key {key!r} has an unknown prefix {prefix!r}; convert reads {', '.join(sorted(PREFIXES))} "
        "(kohya `lora_unet_*` files: load them in the app or `lora inspect` them instead)"
    )


def source_family(parsed: list[ParsedKey]) -> str:
    """'diffusers' or 'comfy', from the prefixes or, for unprefixed files, from the module names.

    Decided per file, not per key: `blocks.N.norm2` is a valid name in both namings with swapped meanings.
    """
    families = {PREFIXES[p.prefix][0] for p in parsed if p.prefix}
    if len(families) > 1:
        raise RequestError("the file mixes diffusers (`transformer.`) and Wan/ComfyUI (`diffusion_model.`) keys; split it first")
    if families:
        return families.pop()
    as_wan = sum(wan_to_diffusers(p.module) is not None and diffusers_to_wan(p.module) is None for p in parsed)
    as_diffusers = sum(diffusers_to_wan(p.module) is not None and wan_to_diffusers(p.module) is None for p in parsed)
    return "diffusers" if as_diffusers > as_wan else "comfy"


def convert_state_dict(tensors: dict, to: str) -> tuple[dict, dict]:
    """Rename every key of a LoRA state dict to `to` naming. Returns (new dict, report).

    Tensors are the same objects (no copy, no cast). Modules the name table does not know (e.g.
    `blocks.0` for a LightX2V `diff_m`) keep their name under the new prefix and are listed in
    the report as `kept_names`, so nothing is dropped silently.
    """
    if to not in FORMATS:
        raise RequestError(f"--to {to!r} is not one of {', '.join(FORMATS)}")
    if not tensors:
        raise RequestError("the LoRA file holds no tensors")
    parsed = {key: parse_key(key) for key in tensors}
    family = source_family(list(parsed.values()))
    experts = {PREFIXES[p.prefix][1] if p.prefix else 0 for p in parsed.values()}
    two_experts = experts == {0, 1}
    to_map = diffusers_to_wan if to == "comfy" else wan_to_diffusers
    suffix_map = _TO_COMFY_SUFFIX if to == "comfy" else _TO_DIFFUSERS_SUFFIX

    out: dict = {}
    kept: set[str] = set()
    for key, p in parsed.items():
        module = p.module
        if family != to:
            renamed = to_map(module)
            if renamed is None:
                kept.add(module)
            else:
                module = renamed
        expert = PREFIXES[p.prefix][1] if p.prefix else 0
        new_key = f"{output_prefix(to, expert, two_experts)}.{module}.{suffix_map.get(p.suffix, p.suffix)}"
        if new_key in out:
            raise RequestError(f"keys {key!r} and another key both become {new_key!r}; the file has duplicate entries")
        out[new_key] = tensors[key]
    report = {
        "from": family,
        "to": to,
        "tensors": len(out),
        "experts": sorted(experts),
        "renamed_modules": len({p.module for p in parsed.values()}) - len(kept) if family != to else 0,
        "kept_names": sorted(kept),
    }
    return out, report


def read_lora_file(path: Path) -> tuple[dict, dict[str, str]]:
    """All tensors (as stored, no cast) and the metadata of a safetensors LoRA file."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise RequestError(f"{path} is not a .safetensors file; convert reads safetensors only")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise RequestError(f"{path} is not a readable safetensors file ({e})") from None
    return tensors, metadata


def write_lora_file(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Write atomically (temp file in the same folder, then os.replace), so a failure leaves no partial file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or None)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def convert_file(src: Path, to: str, out: Path) -> dict:
    """Convert one LoRA file; returns the JSON-able report printed by the CLI."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise RequestError(f"--out {out} is the input file; pick a new file name so the original stays")
    if out.suffix != ".safetensors":
        raise RequestError(f"--out {out} must end in .safetensors")
    tensors, metadata = read_lora_file(src)
    converted, report = convert_state_dict(tensors, to)
    write_lora_file(out, converted, metadata)
    log.info("converted %s (%s) -> %s (%s), %d tensors", src, report["from"], out, to, len(converted))
    return {"file": str(src), "out": str(out), **report, "metadata_keys": sorted(metadata)}
