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
    # ai-toolkit's combined Wan2.2 file (split_multistage_loras=False): transformer_1 = high noise, _2 = low noise
    ("diffusion_model.transformer_1.", MAIN, "diffusers"),
    ("diffusion_model.transformer_2.", LOW, "diffusers"),
    ("transformer.transformer_1.", MAIN, "diffusers"),
    ("transformer.transformer_2.", LOW, "diffusers"),
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
    ("lora_unet__", MAIN, "kohya"),  # VideoX-Fun: a double underscore
    ("lora_unet_", MAIN, "kohya"),
    ("lycoris_", MAIN, "kohya"),  # ai-toolkit's LyCORIS networks (diffusers module names, underscored)
    ("", MAIN, ""),
]

# (suffix, role). Checked in order; the longest specific forms come first.
_SUFFIXES: list[tuple[str, str]] = [
    (".lora_magnitude_vector.default.weight", "magnitude"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
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
    (".dora_scale", "dora_scale"),
    (".lora_mid.weight", "locon_mid"),
    *[(f".{name}", name) for name in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2",
                                      "lokr_t1", "lokr_t2", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                                      "hada_t1", "hada_t2")],
]
_UNSUPPORTED = {  # roles that are rejected on their own, with the reason
    "hada_": "an unknown LoHa tensor (LyCORIS LoHa has hada_w1_a/b, hada_w2_a/b)",
    "lokr_": "an unknown LoKr tensor (LyCORIS LoKr has lokr_w1(_a/_b), lokr_w2(_a/_b), lokr_t2)",
}
_GROUP_UNSUPPORTED = {  # roles that make their whole layer unusable: applying the rest would give wrong numbers
    "locon_mid": "LoCon with a Tucker mid tensor (lora_mid) is not supported",
    "hada_t1": "LoHa with Tucker factors (hada_t1/hada_t2, convolution layers) is not supported",
    "hada_t2": "LoHa with Tucker factors (hada_t1/hada_t2, convolution layers) is not supported",
    "lokr_t1": "lokr_t1 is not part of LyCORIS LoKr (only lokr_t2)",
}
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

# kohya names replace every dot with an underscore; map those back (Wan and diffusers spellings).
_KOHYA_BLOCK = {**{k.replace(".", "_"): ("wan", k) for k in BLOCK_MAP},
                **{v.replace(".", "_"): ("diffusers", v) for v in BLOCK_MAP.values()}}
_KOHYA_TOP = {**{k.replace(".", "_"): ("wan", k) for k in TOP_MAP},
              **{v.replace(".", "_"): ("diffusers", v) for v in TOP_MAP.values()}}
_KOHYA_BLOCK_RE = re.compile(r"^blocks_(\d+)_(.+)$")
_LIGHTX2V_MOD_RE = re.compile(r"^blocks\.\d+$")
# Names that read the same (or swap meaning) in both spellings: decided by the file's majority style.
_AMBIGUOUS_RESTS = {"norm2", "norm3"}
_AMBIGUOUS_TOP = {"patch_embedding"}
# Bare parameters (no .weight): Wan `modulation` tensors live at these diffusers names.
_PARAM_MODULES = {"scale_shift_table"}


@dataclass
class Patch:
    """One change to one parameter: `delta = scale * up @ down` (low rank) or `delta = diff` (full)."""

    target: str  # diffusers parameter name, e.g. "blocks.0.attn1.to_q.weight"
    kind: str  # "lowrank" | "diff" | "lokr" | "loha" | "dora"
    keys: tuple[str, ...]  # the file keys this patch consumes
    down: Any = None  # [rank, in, ...]
    up: Any = None  # [out, rank, ...]
    scale: float = 1.0
    alpha: float | None = None
    diff: Any = None
    factors: dict[str, Any] | None = None  # lokr_*/hada_* tensors by role (LoKr, LoHa)
    inner: "Patch | None" = None  # DoRA: the additive patch whose W0 + ΔW gets renormalised
    magnitude: Any = None  # DoRA: PEFT lora_magnitude_vector [out] or LyCORIS dora_scale [out, 1] / [1, in]
    dora_style: str = ""  # DoRA: "peft" | "lycoris" (what a strength other than 1 means, see merge.dora_apply)

    @property
    def rank(self) -> int | None:
        if self.kind == "lowrank":
            return int(self.down.shape[0])
        if self.kind == "dora" and self.inner is not None:
            return self.inner.rank
        if self.kind == "loha":
            return int(self.factors["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            f = self.factors
            if "lokr_t2" in f:
                return int(f["lokr_t2"].shape[0])
            for k in ("lokr_w1_b", "lokr_w2_b"):
                if k in f:
                    return int(f[k].shape[0])
        return None

    def delta_shape(self) -> tuple[int, ...]:
        if self.kind == "diff":
            return tuple(self.diff.shape)
        if self.kind == "dora":
            return self.inner.delta_shape()
        if self.kind == "loha":
            f = self.factors
            return (int(f["hada_w1_a"].shape[0]), *[int(s) for s in f["hada_w1_b"].shape[1:]])
        if self.kind == "lokr":
            (a, c), (b, d), rest = _lokr_dims(self.factors)
            return (a * b, c * d, *rest)
        return (int(self.up.shape[0]), *[int(s) for s in self.down.shape[1:]])

    def tensors(self) -> list[Any]:
        if self.kind == "diff":
            return [self.diff]
        if self.kind == "dora":
            return [*self.inner.tensors(), self.magnitude]
        if self.kind in ("lokr", "loha"):
            return list(self.factors.values())
        return [self.down, self.up]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def additive(self) -> bool:
        """False for DoRA: its result depends on the weight it is applied to, not only on its own tensors."""
        return self.kind != "dora"

    def delta(self, dtype=None, device=None):
        """The full change this patch makes at strength 1, `scale` included, shaped like the delta (fp32 default)."""
        import torch

        dtype = dtype or torch.float32
        if self.kind == "diff":
            return self.diff.to(device=device, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        if self.kind == "dora":
            raise ValueError(f"{self.target}: a DoRA patch is not additive; merge it with merge.dora_apply")
        if self.kind in ("lokr", "loha"):
            f = {k: v.to(device=device, dtype=acc) for k, v in self.factors.items()}
            w = _lokr_weight(f, self.delta_shape()) if self.kind == "lokr" else _loha_weight(f)
            return (w * self.scale).reshape(self.delta_shape()).to(dtype)
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
        if role == "diff_m" and (_LIGHTX2V_MOD_RE.match(module) or module == "head"):
            module += ".modulation"  # LightX2V writes blocks.N.diff_m / head.diff_m for the modulation tensor
        if role in _UNSUPPORTED:
            rejected[key] = "skipped: " + _UNSUPPORTED[role]
            continue
        kohya = style == "kohya"
        groups.setdefault((slot, module, kohya), {})[role] = key
        if role.startswith("lokr_"):
            formats["LyCORIS LoKr"] += 1
        elif role.startswith("hada_"):
            formats["LyCORIS LoHa"] += 1
        elif role in ("dora_scale", "magnitude"):
            formats["DoRA"] += 1
        elif prefix == "lora_unet__":
            formats["VideoX-Fun"] += 1
        elif prefix.startswith("lycoris_"):
            formats["ai-toolkit LyCORIS"] += 1
        elif ".transformer_1." in prefix or ".transformer_2." in prefix:
            formats["ai-toolkit Wan2.2 combined"] += 1
        elif kohya:
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
    peft_cfg = peft_config(lf.metadata)
    for (slot, module, kohya), roles in groups.items():
        cands = _module_candidates(module, kohya)
        chosen = next((d for s, d in cands if s == style), cands[0][1] if cands else None)
        if chosen is None:
            for key in roles.values():
                rejected[key] = f"unmatched: module {module!r} is not a Wan transformer module"
            continue
        for patch in _patches_for(chosen, roles, tensors, peft_cfg, rejected):
            slots[slot].setdefault(patch.target, []).append(patch)

    consumed = {k for ps in slots.values() for patches in ps.values() for p in patches for k in p.keys}
    for roles in groups.values():
        for role, key in roles.items():
            if key not in consumed and key not in rejected:
                rejected[key] = f"skipped: a {role} tensor with nothing it belongs to on this layer"
    if not any(slots.values()):
        raise LoraFormatError(f"{lf.path.name}: {refusal_reason(keys, rejected)}")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values() if t.is_floating_point()})
    return ParsedLora(
        sha256=lf.sha256, size_bytes=lf.size_bytes, name=lf.path.name, metadata=lf.metadata,
        formats=[f for f, _ in formats.most_common()], style=style, slots=slots,
        rejected=rejected, keys=keys, dtypes=dtypes,
    )


def peft_config(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The PEFT LoraConfig fields diffusers writes into `lora_adapter_metadata`, or None.

    `WanPipeline.save_lora_weights` prefixes every field with `transformer.` (one JSON for all
    components); `save_lora_adapter` writes them bare. Fields PEFT defaults are filled in with
    PEFT's defaults (r=8, lora_alpha=8), as `LoraConfig(**metadata)` would.
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(cfg, dict):
        return None
    prefixed = {k.removeprefix("transformer."): v for k, v in cfg.items() if k.startswith("transformer.")}
    cfg = prefixed or cfg
    out = {"r": cfg.get("r", 8), "lora_alpha": cfg.get("lora_alpha", 8), "use_rslora": bool(cfg.get("use_rslora")),
           "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": cfg.get("alpha_pattern") or {}}
    if not isinstance(out["rank_pattern"], dict) or not isinstance(out["alpha_pattern"], dict):
        return None
    return out


def _pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern that matches the end of the module name at a dot boundary."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            continue
    return None


def peft_scale(cfg: dict[str, Any], module: str) -> tuple[float, int]:
    """(scale, configured rank) of one module under a PEFT config: lora_alpha / r, or / sqrt(r) with use_rslora."""
    import math

    rk = _pattern_key(cfg["rank_pattern"], module)
    ak = _pattern_key(cfg["alpha_pattern"], module)
    r = int(cfg["rank_pattern"][rk] if rk is not None else cfg["r"])
    alpha = float(cfg["alpha_pattern"][ak] if ak is not None else cfg["lora_alpha"])
    return (alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r), r


_OTHER_BASES = [
    (re.compile(r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks)[._]"), "a Stable Diffusion / SDXL UNet LoRA"),
    (re.compile(r"^lora_te\d?_|text_model"), "a Stable Diffusion / SDXL LoRA (text-encoder keys)"),
    (re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]"), "a Flux / HunyuanVideo LoRA"),
    (re.compile(r"(^|[._])transformer_blocks[._]\d+[._]attn"), "a LoRA for another DiT (transformer_blocks: LTX-Video, CogVideoX, SD3 ...)"),
]


def refusal_reason(keys: list[str], rejected: dict[str, str]) -> str:
    """Why a file yields nothing to apply, in words: another base model, or the commonest key-level reason."""
    for pattern, what in _OTHER_BASES:
        hits = [k for k in keys if pattern.search(k)]
        if len(hits) * 2 >= len(keys):
            return f"{what}, not a Wan LoRA ({len(hits)} of {len(keys)} keys, e.g. {hits[0]}); pick a Wan LoRA"
    reasons = Counter(r.partition(": ")[2] for r in rejected.values() if r and "not a LoRA or diff key" not in r)
    if reasons:
        (why, n), = reasons.most_common(1)
        example = next(k for k, r in rejected.items() if r.partition(": ")[2] == why)
        return f"none of its {len(keys)} keys can be applied: {n} {'key' if n == 1 else 'keys'}: {why} (e.g. {example})"
    sample = ", ".join(keys[:3])
    return (f"no recognisable Wan LoRA keys (e.g. {sample}); it is not a Wan LoRA in diffusers/PEFT, Wan/ComfyUI, "
            "kohya/musubi, LightX2V, VideoX-Fun, ai-toolkit or LyCORIS (LoKr/LoHa) format")


def _param_for(module: str) -> str:
    return module if module.rsplit(".", 1)[-1] in _PARAM_MODULES else module + ".weight"


def _alpha_of(tensors, key: str | None) -> float | None:
    if not key:
        return None
    return float(tensors[key].float().reshape(-1)[0])


def _patches_for(module: str, roles: dict[str, str], tensors, peft_cfg, rejected) -> list[Patch]:
    out: list[Patch] = []
    bad = [r for r in roles if r in _GROUP_UNSUPPORTED]
    if bad:
        for key in roles.values():
            rejected[key] = "skipped: " + _GROUP_UNSUPPORTED[bad[0]]
        return out
    down, up, alpha = roles.get("down"), roles.get("up"), roles.get("alpha")
    weight_patches: list[Patch] = []
    lokr = {r: roles[r] for r in _LOKR if r in roles}
    loha = {r: roles[r] for r in _LOHA if r in roles}
    lora_alpha = None if (lokr or loha) else alpha  # one alpha per layer: LyCORIS layers own it when present
    if lokr:
        weight_patches.append(_lokr_patch(module, lokr, alpha, tensors, rejected))
    if loha:
        weight_patches.append(_loha_patch(module, loha, alpha if not lokr else None, tensors, rejected))
    alpha = lora_alpha
    weight_patch = None
    if down and up:
        d, u = tensors[down], tensors[up]
        rank = int(d.shape[0])
        if u.ndim < 2 or int(u.shape[1]) != rank:
            for k in (down, up, alpha):
                if k:
                    rejected[k] = f"skipped: lora_up {tuple(u.shape)} and lora_down {tuple(d.shape)} ranks differ"
        else:
            keys = (down, up) + ((alpha,) if alpha else ())
            a = _alpha_of(tensors, alpha)
            if a is not None:
                scale = a / rank
            elif peft_cfg is not None:
                scale, r_cfg = peft_scale(peft_cfg, module)
                if r_cfg != rank:
                    for k in keys:
                        rejected[k] = (f"skipped: the PEFT metadata gives rank {r_cfg} for {module} but lora_A has rank "
                                       f"{rank} (PEFT refuses such a file)")
                    scale = None
            else:
                scale = 1.0
            if scale is not None:
                weight_patch = Patch(_param_for(module), "lowrank", keys, down=d, up=u, scale=scale, alpha=a)
    elif down or up:
        for k in (down, up):
            if k:
                other = "lora_up/lora_B" if k == down else "lora_down/lora_A"
                rejected[k] = f"skipped: no matching {other} for this key"
    elif alpha and not (lokr or loha):
        rejected[alpha] = "skipped: alpha without a lora_down/lora_up pair"
    weight_patches = [p for p in [*weight_patches, weight_patch] if p is not None]
    mag_key = roles.get("magnitude") or roles.get("dora_scale")
    if mag_key:
        if len(weight_patches) != 1:
            rejected[mag_key] = ("skipped: DoRA magnitude without a LoRA/LoKr/LoHa for the same layer" if not weight_patches
                                 else "skipped: DoRA magnitude on a layer with more than one LoRA kind")
        else:
            dora = _dora_patch(weight_patches[0], mag_key, "peft" if roles.get("magnitude") else "lycoris",
                               tensors, rejected)
            weight_patches = [dora] if dora is not None else []
    out.extend(weight_patches)
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


def _lokr_dims(f: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, ...]]:
    """((a, c), (b, d), kernel): ΔW = kron(w1 [a, c], w2 [b, d, *kernel]) is [a*b, c*d, *kernel]."""
    if "lokr_w1" in f:
        a, c = (int(x) for x in f["lokr_w1"].shape[:2])
    else:
        a, c = int(f["lokr_w1_a"].shape[0]), int(f["lokr_w1_b"].shape[1])
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
        return (a, c), (int(w2.shape[0]), int(w2.shape[1])), tuple(int(x) for x in w2.shape[2:])
    if "lokr_t2" in f:  # Tucker: t2 [r, r, *k], w2_a [r, b], w2_b [r, d]
        return (a, c), (int(f["lokr_w2_a"].shape[1]), int(f["lokr_w2_b"].shape[1])), \
            tuple(int(x) for x in f["lokr_t2"].shape[2:])
    # w2_a [b, r] @ w2_b [r, d*kernel]: the kernel stays folded into d
    return (a, c), (int(f["lokr_w2_a"].shape[0]), int(f["lokr_w2_b"].shape[1])), ()


def _lokr_weight(f: dict[str, Any], shape: tuple[int, ...]):
    """kron(w1, w2) as LyCORIS's LokrModule.get_weight builds it (before the scale)."""
    import torch

    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = torch.einsum("i j ..., i p, j r -> p r ...", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    w1 = w1.reshape(w1.shape[0], -1)
    w2 = w2.reshape(w2.shape[0], -1)
    return torch.kron(w1, w2).reshape(shape)


def _loha_weight(f: dict[str, Any]):
    """(w1_a @ w1_b) * (w2_a @ w2_b), LyCORIS LoHa's Hadamard product (before the scale)."""
    return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])


def _lokr_patch(module, roles, alpha_key, tensors, rejected) -> Patch | None:
    """LoKr with the trainer's scale (LyCORIS LokrModule.__init__/forward, ai-toolkit's copy of it).

    scale = alpha / rank only when a factor is low-rank (w1_a/b or w2_a/b); with full w1 and w2
    the trainer forces alpha = rank, i.e. scale 1, whatever alpha the file stores (ai-toolkit
    writes 9999999999, which an fp16 save turns into inf). The rank is w1_a's (else w2_a's, else
    t2's) inner dimension; a missing or zero alpha means alpha = rank. The scale is applied once,
    as forward() does; LyCORIS's merge_to() (get_diff_weight) applies it twice, and recent ComfyUI
    scales full LoKr by alpha; we follow the trainer's forward().
    """
    keys = tuple(roles.values()) + ((alpha_key,) if alpha_key else ())
    f = {r: tensors[k] for r, k in roles.items()}
    has1 = "lokr_w1" in f or ("lokr_w1_a" in f and "lokr_w1_b" in f)
    has2 = "lokr_w2" in f or ("lokr_w2_a" in f and "lokr_w2_b" in f)
    if not (has1 and has2):
        missing = "lokr_w1 (or lokr_w1_a + lokr_w1_b)" if not has1 else "lokr_w2 (or lokr_w2_a + lokr_w2_b)"
        for k in keys:
            rejected[k] = f"skipped: LoKr layer without {missing}"
        return None
    alpha = _alpha_of(tensors, alpha_key)
    if "lokr_w1" in f and "lokr_w2" in f:
        scale = 1.0
    else:
        if "lokr_w1_a" in f:
            rank = int(f["lokr_w1_a"].shape[1])
        elif "lokr_t2" in f:
            rank = int(f["lokr_t2"].shape[0])  # LyCORIS's loader reads w2_a.size(1) here, which is b under Tucker
        else:
            rank = int(f["lokr_w2_a"].shape[1])
        if alpha is not None and alpha != alpha or alpha in (float("inf"), float("-inf")):
            for k in keys:
                rejected[k] = f"skipped: LoKr alpha is {alpha} with a low-rank factor (rank {rank}); the scale is undefined"
            return None
        scale = (alpha if alpha else rank) / rank
    return Patch(_param_for(module), "lokr", keys, scale=scale, alpha=alpha, factors=f)


def _loha_patch(module, roles, alpha_key, tensors, rejected) -> Patch | None:
    """LoHa: ΔW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank (LyCORIS LohaModule; alpha 0/missing = rank)."""
    keys = tuple(roles.values()) + ((alpha_key,) if alpha_key else ())
    if len(roles) != 4:
        missing = sorted(set(_LOHA) - set(roles))
        for k in keys:
            rejected[k] = f"skipped: LoHa layer without {', '.join(missing)}"
        return None
    f = {r: tensors[k] for r, k in roles.items()}
    rank = int(f["hada_w1_b"].shape[0])
    alpha = _alpha_of(tensors, alpha_key)
    if alpha is not None and (alpha != alpha or alpha in (float("inf"), float("-inf"))):
        for k in keys:
            rejected[k] = f"skipped: LoHa alpha is {alpha}; the scale is undefined"
        return None
    return Patch(_param_for(module), "loha", keys, scale=(alpha if alpha else rank) / rank, alpha=alpha, factors=f)


def _dora_patch(inner: Patch, mag_key: str, style: str, tensors, rejected) -> Patch | None:
    """DoRA: W = m * (W0 + ΔW) / ||W0 + ΔW||, per output row (PEFT vector, dora_scale [out, 1]) or per input
    column (dora_scale [1, in], LyCORIS before April 2025). See merge.dora_apply for strengths other than 1."""
    m = tensors[mag_key]
    shape = inner.delta_shape()
    numel_rest = 1
    for s in shape[1:]:
        numel_rest *= s
    ok = (m.numel() == shape[0] and (style == "peft" or m.shape[0] == shape[0])) or \
        (style == "lycoris" and m.ndim >= 2 and m.shape[0] == 1 and m.numel() * shape[0] != m.numel() and
         m.numel() == (shape[1] if len(shape) > 1 else 1))
    if not ok:
        for k in (*inner.keys, mag_key):
            rejected[k] = f"skipped: DoRA magnitude {tuple(m.shape)} fits neither the rows nor the columns of {shape}"
        return None
    return Patch(inner.target, "dora", (*inner.keys, mag_key), scale=inner.scale, alpha=inner.alpha, inner=inner,
                 magnitude=m, dora_style=style)
