"""What a LoRA is (format, rank, family, experts) and how much of it lands on a given model (coverage)."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from engine.models.catalog import FAMILY_BY_WIDTH
from engine.lora.errors import LoraIncompatibleError
from engine.lora.files import metadata_summary
from engine.lora.formats import LOW, MAIN, ParsedLora, Patch

_HIGH_RE = re.compile(r"(?:^|[^a-z0-9])(high(?:[_ -]?noise)?|hn)(?:[^a-z0-9]|$)", re.I)
_LOW_RE = re.compile(r"(?:^|[^a-z0-9])(low(?:[_ -]?noise)?|ln)(?:[^a-z0-9]|$)", re.I)
_IMAGE_PARTS = ("add_k_proj", "add_v_proj", "norm_added_k", "image_embedder")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def expert_hint(filename: str) -> str | None:
    """'high_noise' / 'low_noise' when the file name says so (high/low, HN/LN), else None."""
    stem = filename.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    high, low = bool(_HIGH_RE.search(stem)), bool(_LOW_RE.search(stem))
    if high and not low:
        return "high_noise"
    if low and not high:
        return "low_noise"
    return None


def lora_width(parsed: ParsedLora) -> int | None:
    """Transformer width the LoRA was trained on, told from the shapes of its block patches."""
    votes: Counter[int] = Counter()
    for slot in (MAIN, LOW):
        for p in parsed.patches(slot):
            shape = p.delta_shape()
            t = p.target
            if len(shape) < 2:  # a 1-D diff says nothing about the width (and is refused at apply)
                continue
            if re.search(r"\.attn1\.to_[qkv]\.weight$|\.attn2\.to_q\.weight$|\.ffn\.net\.0\.proj\.weight$", t):
                votes[shape[1]] += 1
            elif re.search(r"\.to_out\.0\.weight$|\.ffn\.net\.2\.weight$|\.attn\d\.to_[qkv]\.bias$", t):
                votes[shape[0]] += 1
            elif t.endswith("scale_shift_table"):
                votes[shape[-1]] += 1
    return votes.most_common(1)[0][0] if votes else None


def family_name(width: int | None) -> str:
    if width is None:
        return "unknown"
    return FAMILY_BY_WIDTH.get(width, f"unknown family (width {width})")


def _area(target: str) -> str:
    if any(part in target for part in _IMAGE_PARTS):
        return "image cross-attention"
    if ".attn1." in target:
        return "self-attention"
    if ".attn2." in target:
        return "cross-attention"
    if ".ffn." in target:
        return "feed-forward"
    if target.startswith("blocks."):
        return "block norms/modulation"
    if target.startswith("condition_embedder") or target.startswith("patch_embedding"):
        return "embeddings"
    return "head"


def describe(parsed: ParsedLora, filename: str | None = None) -> dict[str, Any]:
    """Inspection of a parsed LoRA on its own (no model)."""
    ranks: Counter[int] = Counter()
    alphas: Counter[float] = Counter()
    kinds: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    blocks: set[int] = set()
    max_delta = 0
    targets_by_slot = {}
    for slot in (MAIN, LOW):
        patches = parsed.patches(slot)
        targets_by_slot[slot] = len({p.target for p in patches})
        for p in patches:
            kinds[p.kind] += 1
            areas[_area(p.target)] += 1
            if p.rank is not None:
                ranks[p.rank] += 1
                if p.alpha is not None and abs(p.alpha) != float("inf"):  # ai-toolkit's full LoKr: inf, unused
                    alphas[p.alpha] += 1
            n = 1
            for s in p.delta_shape():
                n *= s
            max_delta = max(max_delta, n)
            m = _BLOCK_RE.match(p.target)
            if m:
                blocks.add(int(m.group(1)))
    width = lora_width(parsed)
    tensor_bytes = parsed.nbytes()
    name = filename or parsed.name
    info: dict[str, Any] = {
        "file": name,
        "sha256": parsed.sha256,
        "size_bytes": parsed.size_bytes,
        "format": parsed.formats[0] if parsed.formats else "unknown",
        "formats": parsed.formats,
        "naming": parsed.style,
        "rank": ranks.most_common(1)[0][0] if ranks else None,
        "ranks": sorted(ranks),
        "alpha": alphas.most_common(1)[0][0] if alphas else None,
        "alphas": sorted(alphas),
        "dtype": parsed.dtypes[0] if len(parsed.dtypes) == 1 else ",".join(parsed.dtypes),
        "keys": len(parsed.keys),
        "patches": dict(kinds),
        "targets": targets_by_slot[MAIN] + targets_by_slot[LOW],
        "targets_by_area": dict(areas),
        "blocks": len(blocks),
        "width": width,
        "family": family_name(width),
        "image_keys": bool(areas.get("image cross-attention")),
        "two_expert": parsed.two_expert,
        "expert_hint": "both (two-expert file)" if parsed.two_expert else expert_hint(name),
        "rejected_keys": len(parsed.rejected),
        # Apply needs the LoRA tensors in RAM plus one layer's fp32 scratch (rows are chunked).
        "tensor_bytes": tensor_bytes,
        "apply_memory_bytes": tensor_bytes + min(max_delta * 4, 64 << 20),
    }
    info.update(metadata_summary(parsed.metadata))
    return info


def width_of_shapes(shapes: dict[str, tuple[int, ...]]) -> int | None:
    s = shapes.get("blocks.0.attn1.to_q.weight")
    return int(s[1]) if s else None


def check_family(parsed: ParsedLora, model_width: int | None, model_label: str, name: str | None = None) -> None:
    """Raise LoraIncompatibleError when the LoRA was trained on another width than the model's."""
    width = lora_width(parsed)
    if width is None or model_width is None or width == model_width:
        return
    raise LoraIncompatibleError(
        f"{name or parsed.name} was made for {family_name(width)} (width {width}); "
        f"this model is {model_label} (width {model_width}); pick a LoRA trained for this model"
    )


def patch_status(p: Patch, shapes: dict[str, tuple[int, ...]]) -> tuple[str, str]:
    """('applied', '') | ('skipped'|'unmatched'|'shape_mismatch', reason) of one patch on a model."""
    shape = shapes.get(p.target)
    if shape is None:
        if any(part in p.target for part in _IMAGE_PARTS):
            return "skipped", "image cross-attention key; this model has no image branch (text-to-video)"
        m = _BLOCK_RE.match(p.target)
        if m:
            layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
            if int(m.group(1)) >= layers:
                return "unmatched", f"block {m.group(1)} does not exist (the model has {layers} blocks)"
        return "unmatched", f"the model has no parameter {p.target}"
    n_delta = n_param = 1
    for s in p.delta_shape():
        n_delta *= s
    for s in shape:
        n_param *= s
    ok = n_delta == n_param and (p.delta_shape()[0] == shape[0] if shape and p.kind == "lowrank" else True)
    if not ok:
        return "shape_mismatch", f"{p.target}: LoRA delta {p.delta_shape()} vs weight {shape}"
    return "applied", ""


@dataclass
class Coverage:
    """Per-expert outcome of one slot: applied patches and a (bucket, reason) for every other key."""

    patches: list[Patch] = field(default_factory=list)
    applied_keys: set[str] = field(default_factory=set)
    reasons: dict[str, tuple[str, str]] = field(default_factory=dict)
    total: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"applied": len(self.applied_keys), "total": self.total,
                               "skipped": [], "unmatched": [], "shape_mismatch": []}
        for key, (bucket, reason) in self.reasons.items():
            out[bucket].append(f"{key}: {reason}")
        return out


def coverage(parsed: ParsedLora, slot: str, shapes: dict[str, tuple[int, ...]]) -> Coverage:
    """Coverage of one slot's keys on one expert, and the patches that apply."""
    cov = Coverage()
    for p in parsed.patches(slot):
        status, reason = patch_status(p, shapes)
        cov.total += len(p.keys)
        if status == "applied":
            cov.applied_keys.update(p.keys)
            cov.patches.append(p)
        else:
            for k in p.keys:
                cov.reasons[k] = (status, reason)
    return cov


def file_coverage(parsed: ParsedLora, per_expert: dict[str, Coverage], used_slots: set[str],
                  unused_reason: str | None = None) -> dict[str, Any]:
    """Whole-file coverage: every key of the file is applied (on some expert), skipped or unmatched."""
    applied: set[str] = set()
    reasons: dict[str, tuple[str, str]] = {}
    for cov in per_expert.values():
        applied |= cov.applied_keys
        for key, why in cov.reasons.items():
            reasons.setdefault(key, why)
    for key, reason in parsed.rejected.items():
        bucket, _, text = reason.partition(": ")
        reasons.setdefault(key, (bucket if bucket in ("skipped", "unmatched") else "skipped", text))
    for slot in (MAIN, LOW):
        if slot in used_slots:
            continue
        if unused_reason:
            why = unused_reason
        elif slot == LOW:
            why = "low-noise part of a two-expert file; no low-noise expert takes it"
        else:
            why = "high-noise part of a two-expert file; no high-noise expert takes it"
        for p in parsed.patches(slot):
            for k in p.keys:
                reasons.setdefault(k, ("skipped", why))
    out: dict[str, Any] = {"applied": 0, "total": len(parsed.keys), "skipped": [], "unmatched": [], "shape_mismatch": []}
    for key in parsed.keys:
        if key in applied:
            out["applied"] += 1
        else:
            bucket, reason = reasons.get(key, ("skipped", "not used by this stack entry"))
            out[bucket].append(f"{key}: {reason}")
    return out
