"""The module-name map between original Wan / ComfyUI names and diffusers' WanTransformer3DModel names.

One table, used in both directions: by LoRA normalisation (Wan -> diffusers) and by
`lora convert` (either way). It mirrors diffusers' scripts/convert_wan_to_diffusers.py.
"""
from __future__ import annotations

import re

# Per-block sub-module renames (the part after `blocks.N.`), original Wan -> diffusers.
BLOCK_MAP: dict[str, str] = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    # Wan orders its norms norm1, norm3 (cross-attention), norm2; diffusers renumbers them.
    "norm3": "norm2",
    "norm2": "norm3",
    "modulation": "scale_shift_table",
}

# Top-level (embedding / head) renames, original Wan -> diffusers.
TOP_MAP: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_MAP_REV = {v: k for k, v in BLOCK_MAP.items()}
_TOP_MAP_REV = {v: k for k, v in TOP_MAP.items()}


def _translate(module: str, block_map: dict[str, str], top_map: dict[str, str]) -> str | None:
    m = _BLOCK_RE.match(module)
    if m:
        idx, rest = m.groups()
        if rest in block_map:
            return f"blocks.{idx}.{block_map[rest]}"
        return None
    return top_map.get(module)


def wan_to_diffusers(module: str) -> str | None:
    """`blocks.3.self_attn.q` -> `blocks.3.attn1.to_q`; None when the name is not a Wan module name."""
    return _translate(module, BLOCK_MAP, TOP_MAP)


def diffusers_to_wan(module: str) -> str | None:
    """`blocks.3.attn1.to_q` -> `blocks.3.self_attn.q`; None when the name is not a diffusers Wan module."""
    return _translate(module, _BLOCK_MAP_REV, _TOP_MAP_REV)
