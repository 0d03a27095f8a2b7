"""Normalise every LoRA key family to diffusers WanTransformer3DModel parameter names.

A file's keys become `Patch`es (a low-rank pair or a full diff aimed at one parameter) in one of
two slots: "main" and "low_noise" (the second expert of a two-expert file). Every key of the file
is either part of a patch or listed in `ParsedLora.rejected` with the reason, so a coverage
report can account for all of them.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from engine.lora.errors import LoraFormatError
from engine.lora.files import LoraFile
from engine.lora.names import BLOCK_MAP, TOP_MAP, diffusers_to_wan, wan_to_diffusers

MAIN, LOW = "main", "low_noise"

# (prefix, slot, style hint). Longest first; underscore prefixes are kohya/musubi style.
_PREFIXES: list[tuple[str, str, str]] = [
    ("base_model.model.transformer_2.", LOW, "diffusers"),
    ("base_model.model.transformer.", MAIN, "diffusers"),
    ("base_model.model.", MAIN, "diffusers"),
    ("model.diffusion_model_2.", LOW, "wan"),
    ("model.diffusion_model.", MAIN, "wan"),
    ("diffusion_model_2.", LOW, "wan"),
    ("diffusion_model.", MAIN, "wan"),
    ("lora_transformer_2.", LOW, "diffusers"),
    ("lora_transformer.", MAIN, "diffusers"),
    ("lora_transformer_2_", LOW, "kohya"),
    ("lora_transformer_", MAIN, "kohya"),
    ("transformer_2.", LOW, "diffusers"),
    ("transformer.", MAIN, "diffusers"),
    ("lora_unet_2_", LOW, "kohya"),
    ("lora_unet_", MAIN, "kohya"),
    ("", MAIN, ""),
]

# (suffix, role). Checked in order; the longest specific forms come first.
_SUFFIXES: list[tuple[str, str]] = [
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "bias"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff_m", "diff_m"),
    (".diff", "diff"),
    (".dora_scale", "dora"),
    (".lora_mid.weight", "locon_mid"),
]
_UNSUPPORTED = {
    "hada_": "LoHa (LyCORIS) layers are not supported; use a plain LoRA",
    "lokr_": "LoKr (LyCORIS) layers are not supported; use a plain LoRA",
    "locon_mid": "LoCon mid (tucker) layers are not supported",
}

# kohya names replace every dot with an underscore; map those back (Wan and diffusers spellings).
_KOHYA_BLOCK = {**{k.replace(".", "_"): ("wan", k) for k in BLOCK_MAP},
                **{v.replace(".", "_"): ("diffusers", v) for v in BLOCK_MAP.values()}}
_KOHYA_TOP = {**{k.replace(".", "_"): ("wan", k) for k in TOP_MAP},
              **{v.replace(".", "_"): ("diffusers", v) for v in TOP_MAP.values()}}
_KOHYA_BLOCK_RE = re.compile(r"^blocks_(\d+)_(.+)$")
# Names that read the same (or swap meaning) in both spellings: decided by the file's majority style.
_AMBIGUOUS_RESTS = {"norm2", "norm3"}
_AMBIGUOUS_TOP = {"patch_embedding"}
# Bare parameters (no .weight): Wan `modulation` tensors live at these diffusers names.
_PARAM_MODULES = {"scale_shift_table"}


@dataclass
class Patch:
    """One change to one parameter: `delta = scale * up @ down` (low rank) or `delta = diff` (full)."""

    target: str  # diffusers parameter name, e.g. "blocks.0.attn1.to_q.weight"
    kind: str  # "lowrank" | "diff"
    keys: tuple[str, ...]  # the file keys this patch consumes
    down: Any = None  # [rank, in, ...]
    up: Any = None  # [out, rank, ...]
    scale: float = 1.0
    alpha: float | None = None
    diff: Any = None

    @property
    def rank(self) -> int | None:
        return int(self.down.shape[0]) if self.kind == "lowrank" else None

    def delta_shape(self) -> tuple[int, ...]:
        if self.kind == "diff":
            return tuple(self.diff.shape)
        return (int(self.up.shape[0]), *[int(s) for s in self.down.shape[1:]])

    def nbytes(self) -> int:
        ts = [self.diff] if self.kind == "diff" else [self.down, self.up]
        return sum(t.numel() * t.element_size() for t in ts)

    def delta(self, dtype=None, device=None):
        """The full change this patch makes at strength 1, `scale` included, shaped like the delta (fp32 default)."""
        import torch

        dtype = dtype or torch.float32
        if self.kind == "diff":
            return self.diff.to(device=device, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        out = int(self.up.shape[0])
        rank = int(self.down.shape[0])
        up = self.up.reshape(out, rank).to(device=device, dtype=acc)
        down = self.down.reshape(rank, -1).to(device=device, dtype=acc)
        return ((up * self.scale) @ down).reshape(self.delta_shape()).to(dtype)


@dataclass
class ParsedLora:
    sha256: str
    size_bytes: int
    name: str
    metadata: dict[str, str]
    formats: list[str]
    style: str  # "wan" | "diffusers"
    slots: dict[str, dict[str, list[Patch]]]  # slot -> target -> patches in file order
    rejected: dict[str, str]  # key -> reason (keys not part of any patch)
    keys: list[str]
    dtypes: list[str]

    @property
    def two_expert(self) -> bool:
        return bool(self.slots.get(LOW))

    def patches(self, slot: str) -> list[Patch]:
        return [p for ps in self.slots.get(slot, {}).values() for p in ps]

    def nbytes(self) -> int:
        return sum(p.nbytes() for s in self.slots for p in self.patches(s))


def _split_prefix(key: str) -> tuple[str, str, str, str]:
    for prefix, slot, style in _PREFIXES:
        if key.startswith(prefix):
            return prefix, key[len(prefix):], slot, style
    raise AssertionError("the empty prefix always matches")


def _split_suffix(rest: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if rest.endswith(suffix):
            return rest[: -len(suffix)], role
    for marker in ("hada_", "lokr_"):
        idx = rest.find("." + marker)
        if idx >= 0:
            return rest[:idx], marker
    return None


def _module_candidates(module: str, kohya: bool) -> list[tuple[str, str]]:
    """(style, diffusers module name) readings of one module path."""
    if kohya:
        m = _KOHYA_BLOCK_RE.match(module)
        if m:
            idx, rest = m.groups()
            hit = _KOHYA_BLOCK.get(rest)
            if not hit:
                return []
            style, dotted = hit
            module = f"blocks.{idx}.{dotted}"
        else:
            hit = _KOHYA_TOP.get(module)
            if not hit:
                return []
            style, module = hit
        if style == "diffusers":
            return [("diffusers", module)]
        d = wan_to_diffusers(module)
        return [("wan", d)] if d else []
    out = []
    if diffusers_to_wan(module) is not None or module == "scale_shift_table":
        out.append(("diffusers", module))
    d = wan_to_diffusers(module)
    if d is not None:
        out.append(("wan", d))
    return out


def _is_ambiguous(module: str, kohya: bool) -> bool:
    sep = "_" if kohya else "."
    tail = module.rsplit(sep, 1)[-1]
    return tail in _AMBIGUOUS_RESTS or module in _AMBIGUOUS_TOP


def parse_lora(lf: LoraFile) -> ParsedLora:
    """Group a file's keys into patches on diffusers parameter names; raise LoraFormatError when nothing is usable."""
    tensors = lf.tensors
    keys = list(tensors)
    dora = [k for k in keys if k.endswith(".dora_scale")]
    if dora:
        raise LoraFormatError(
            f"{lf.path.name} is a DoRA LoRA ({len(dora)} dora_scale keys, e.g. {dora[0]}); DoRA is not supported, "
            "use a plain LoRA version of it"
        )
    rejected: dict[str, str] = {}
    # (slot, module path as written, kohya?) -> role -> key
    groups: dict[tuple[str, str, bool], dict[str, str]] = {}
    formats: Counter[str] = Counter()
    for key in keys:
        prefix, rest, slot, style = _split_prefix(key)
        split = _split_suffix(rest)
        if split is None:
            rejected[key] = "unmatched: not a LoRA or diff key (no lora_A/B, lora_down/up, alpha or diff suffix)"
            continue
        module, role = split
        if role in _UNSUPPORTED:
            rejected[key] = "skipped: " + _UNSUPPORTED[role]
            continue
        kohya = style == "kohya"
        groups.setdefault((slot, module, kohya), {})[role] = key
        if kohya:
            formats["kohya/musubi"] += 1
        elif role in ("diff", "diff_b", "diff_m"):
            formats["LightX2V diff"] += 1
        elif ".lora_A" in key or ".lora_B" in key:
            formats["diffusers/PEFT"] += 1
        else:
            formats["Wan/ComfyUI"] += 1

    # The file's naming style decides the ambiguous names (norm2/norm3 swap between spellings).
    votes: Counter[str] = Counter()
    for (slot, module, kohya) in groups:
        cands = _module_candidates(module, kohya)
        if len(cands) == 1 and not _is_ambiguous(module, kohya):
            votes[cands[0][0]] += 1
    if votes:
        style = votes.most_common(1)[0][0]
    else:
        hints = Counter(_split_prefix(k)[3] for k in keys)
        style = "diffusers" if hints["diffusers"] >= hints["wan"] else "wan"

    slots: dict[str, dict[str, list[Patch]]] = {MAIN: {}, LOW: {}}
    peft_scale = _peft_scale(lf.metadata)
    for (slot, module, kohya), roles in groups.items():
        cands = _module_candidates(module, kohya)
        chosen = next((d for s, d in cands if s == style), cands[0][1] if cands else None)
        if chosen is None:
            for key in roles.values():
                rejected[key] = f"unmatched: module {module!r} is not a Wan transformer module"
            continue
        for patch in _patches_for(chosen, roles, tensors, peft_scale, rejected):
            slots[slot].setdefault(patch.target, []).append(patch)

    if not any(slots.values()):
        sample = ", ".join(keys[:3])
        raise LoraFormatError(
            f"{lf.path.name} has no recognisable Wan LoRA keys (e.g. {sample}); it is not a Wan LoRA "
            "in diffusers, Wan/ComfyUI, kohya/musubi or LightX2V format"
        )
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values() if t.is_floating_point()})
    return ParsedLora(
        sha256=lf.sha256, size_bytes=lf.size_bytes, name=lf.path.name, metadata=lf.metadata,
        formats=[f for f, _ in formats.most_common()], style=style, slots=slots,
        rejected=rejected, keys=keys, dtypes=dtypes,
    )


def _peft_scale(metadata: dict[str, str]) -> float | None:
    """diffusers writes the PEFT config (r, lora_alpha) into the metadata; the scale is alpha / r."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if cfg.get("alpha_pattern") or cfg.get("rank_pattern"):
            return None  # per-module overrides: fall back to alpha keys / scale 1 rather than guess
        return float(alpha) / float(r) if r and alpha else None
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None


def _param_for(module: str) -> str:
    return module if module.rsplit(".", 1)[-1] in _PARAM_MODULES else module + ".weight"


def _patches_for(module: str, roles: dict[str, str], tensors, peft_scale, rejected) -> list[Patch]:
    out: list[Patch] = []
    down, up, alpha = roles.get("down"), roles.get("up"), roles.get("alpha")
    if down and up:
        d, u = tensors[down], tensors[up]
        rank = int(d.shape[0])
        if u.ndim < 2 or int(u.shape[1]) != rank:
            for k in (down, up, alpha):
                if k:
                    rejected[k] = f"skipped: lora_up {tuple(u.shape)} and lora_down {tuple(d.shape)} ranks differ"
        else:
            keys = (down, up) + ((alpha,) if alpha else ())
            if alpha:
                a = float(tensors[alpha].float().reshape(-1)[0])
                scale = a / rank
            else:
                a = None
                scale = peft_scale if peft_scale is not None else 1.0
            out.append(Patch(_param_for(module), "lowrank", keys, down=d, up=u, scale=scale, alpha=a))
    else:
        for k in (down, up):
            if k:
                other = "lora_up/lora_B" if k == down else "lora_down/lora_A"
                rejected[k] = f"skipped: no matching {other} for this key"
        if alpha:
            rejected[alpha] = "skipped: alpha without a lora_down/lora_up pair"
    if roles.get("diff"):
        out.append(Patch(_param_for(module), "diff", (roles["diff"],), diff=tensors[roles["diff"]]))
    if roles.get("diff_b"):
        target = module + ".bias"
        out.append(Patch(target, "diff", (roles["diff_b"],), diff=tensors[roles["diff_b"]]))
    if roles.get("bias"):  # PEFT lora_bias: the bias of lora_B adds to the layer's bias
        out.append(Patch(module + ".bias", "diff", (roles["bias"],), diff=tensors[roles["bias"]]))
    if roles.get("diff_m"):  # a diff for a bare parameter (Wan `modulation`)
        out.append(Patch(module, "diff", (roles["diff_m"],), diff=tensors[roles["diff_m"]]))
    return out
