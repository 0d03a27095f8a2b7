"""`lora convert`: rename a LoRA's keys between diffusers names and original Wan / ComfyUI names.

Reading and normalisation are the LoRA engine's (files.read_lora_file, formats.parse_lora), so
every format the app loads (diffusers/PEFT, Wan/ComfyUI, kohya/musubi, LightX2V diffs, two-expert
files) can be converted. Only names change: every tensor is written back bit for bit, `.alpha`
stays, and the file's metadata is kept. Module names go through engine.lora.names.

    diffusers  transformer.blocks.0.attn1.to_q.lora_A.weight
    comfy      diffusion_model.blocks.0.self_attn.q.lora_down.weight
    two experts: lora_transformer / lora_transformer_2  <->  diffusion_model / diffusion_model_2
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from engine.lora.errors import LoraFormatError
from engine.lora.names import diffusers_to_wan
from engine.types import RequestError

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "comfy")

# Output suffix per patch role, in each naming (diff, diff_b, diff_m keep their names).
_SUFFIX = {
    "diffusers": {"down": "lora_A.weight", "up": "lora_B.weight", "magnitude": "lora_magnitude_vector.weight"},
    "comfy": {"down": "lora_down.weight", "up": "lora_up.weight", "magnitude": "dora_scale"},
}
_MODULATION = re.compile(r"^(?:blocks\.(\d+)\.)?scale_shift_table$")


def output_prefix(fmt: str, expert_index: int, two_experts: bool) -> str:
    """The key prefix this tool writes: one expert -> `transformer` / `diffusion_model`;
    a file with both experts -> `lora_transformer`+`lora_transformer_2` / `diffusion_model`+`diffusion_model_2`."""
    if fmt == "comfy":
        return "diffusion_model_2" if expert_index else "diffusion_model"
    if two_experts:
        return "lora_transformer_2" if expert_index else "lora_transformer"
    return "transformer_2" if expert_index else "transformer"


def lora_key(fmt: str, expert_index: int, two_experts: bool, module: str, role: str) -> str:
    """The key this tool writes for `module` (diffusers naming) and a role (down, up, alpha, diff, diff_b, diff_m).

    A modulation table (`scale_shift_table`, Wan's `modulation`) is written as LightX2V writes it,
    `diffusion_model.blocks.N.diff_m` / `diffusion_model.head.diff_m`, which LightX2V, WanVideoWrapper
    and ComfyUI read (in diffusers naming: `transformer.blocks.N.scale_shift_table.diff_m`).
    """
    m = _MODULATION.match(module)
    if m and role in ("diff", "diff_m"):
        role = "diff_m"
        if fmt == "comfy":
            module = f"blocks.{m.group(1)}" if m.group(1) is not None else "head"
            return f"{output_prefix(fmt, expert_index, two_experts)}.{module}.diff_m"
    if fmt == "comfy":
        module = diffusers_to_wan(module) or module
    return f"{output_prefix(fmt, expert_index, two_experts)}.{module}.{_SUFFIX[fmt].get(role, role)}"


def _diff_role(key: str) -> str:
    for suffix, role in ((".diff_b", "diff_b"), (".lora_B.bias", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff")):
        if key.endswith(suffix):
            return role
    raise LoraFormatError(f"key {key!r} is a full difference without a diff/diff_b/diff_m suffix")


def _role_of(key: str) -> str:
    """down/up/alpha/lokr_*/hada_*/dora_scale/magnitude: the role of a key, as formats.parse_lora reads it."""
    from engine.lora.formats import _split_prefix, _split_suffix

    split = _split_suffix(_split_prefix(key)[1])
    if split is None:
        raise LoraFormatError(f"key {key!r} has no LoRA suffix")
    return split[1]


def _module_of(target: str, role: str) -> str:
    """The module path a key is written under: parameter name minus .weight/.bias (bare parameters stay)."""
    if role == "diff_b":
        return target.removesuffix(".bias")
    if role == "diff_m":
        return target
    return target.removesuffix(".weight")


def convert_parsed(parsed, tensors: dict, to: str) -> tuple[dict, dict]:
    """Rename the keys of a LoRA parsed by the engine (formats.parse_lora) to `to` naming.

    Returns (new state dict, report). Tensors are the file's own objects: no copy, no cast. A
    low-rank pair whose scale came from PEFT metadata instead of an `.alpha` key gets an `.alpha`
    (= scale * rank), so the scale survives in loaders that ignore the metadata.
    """
    import torch

    from engine.lora.formats import LOW, MAIN

    if to not in FORMATS:
        raise RequestError(f"--to {to!r} is not one of {', '.join(FORMATS)}")
    if parsed.rejected:
        key, reason = next(iter(parsed.rejected.items()))
        raise LoraFormatError(
            f"{parsed.name}: {len(parsed.rejected)} key(s) cannot be converted (e.g. {key}: {reason}); "
            "convert keeps every tensor, so it stops rather than drop them"
        )
    slots = [s for s in (MAIN, LOW) if parsed.slots.get(s)]
    two_experts = len(slots) == 2
    out: dict = {}
    alpha_added = 0

    def put(new_key: str, value, source_key: str) -> None:
        if new_key in out:
            raise LoraFormatError(
                f"{parsed.name}: {source_key} and another key both become {new_key}; the file has duplicate entries"
            )
        out[new_key] = value

    dora_from_peft = 0
    for slot in slots:
        index = 1 if slot == LOW else 0
        for patch in parsed.patches(slot):
            if patch.kind in ("lowrank", "lokr", "loha", "dora"):
                module = _module_of(patch.target, "weight")
                for key in patch.keys:
                    role = _role_of(key)
                    value = tensors[key]
                    if role == "magnitude" and to == "comfy":  # PEFT's [out] vector as a per-row dora_scale [out, 1]
                        value = value.reshape(-1, 1)
                        dora_from_peft += 1
                    put(lora_key(to, index, two_experts, module, role), value, key)
            else:
                role = _diff_role(patch.keys[0])
                module = _module_of(patch.target, role)
                put(lora_key(to, index, two_experts, module, role), tensors[patch.keys[0]], patch.keys[0])
            low = patch.inner if patch.kind == "dora" else patch
            if low.kind == "lowrank" and low.alpha is None and low.scale != 1.0:
                alpha = torch.tensor(low.scale * low.rank, dtype=torch.float32)
                put(lora_key(to, index, two_experts, module, "alpha"), alpha, patch.keys[0])
                alpha_added += 1
    report = {
        "from": parsed.formats,
        "naming": parsed.style,
        "to": to,
        "tensors": len(out),
        "experts": ["high_noise", "low_noise"] if two_experts else (["low_noise"] if slots == [LOW] else ["single"]),
        "alpha_added": alpha_added,
    }
    if dora_from_peft:
        report["note"] = (f"{dora_from_peft} PEFT DoRA magnitude vectors written as dora_scale [out, 1]: the same "
                          "weights at strength 1; at other strengths loaders give dora_scale LyCORIS's meaning")
    return out, report


def write_lora_file(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Write atomically (temp file in the same folder, then os.replace), so a failure leaves no partial file."""
    from safetensors.torch import save_file

    from engine.fileio import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or None)


def convert_file(src: Path, to: str, out: Path, *, allow_pickle: bool = False) -> dict:
    """Convert one LoRA file (any format the engine reads); returns the JSON-able report printed by the CLI."""
    from engine.lora.files import read_lora_file
    from engine.lora.formats import parse_lora

    src, out = Path(src), Path(out)
    if to not in FORMATS:
        raise RequestError(f"--to {to!r} is not one of {', '.join(FORMATS)}")
    if out.suffix != ".safetensors":
        raise RequestError(f"--out {out} must end in .safetensors")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise RequestError(f"--out {out} is the input file; pick a new file name so the original stays")
    lf = read_lora_file(src, allow_pickle=allow_pickle)
    converted, report = convert_parsed(parse_lora(lf), lf.tensors, to)
    write_lora_file(out, converted, lf.metadata)
    log.info("converted %s (%s) -> %s (%s), %d tensors", src, ", ".join(report["from"]), out, to, len(converted))
    return {"file": str(src), "out": str(out), **report, "metadata_keys": sorted(lf.metadata)}
