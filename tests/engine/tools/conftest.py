"""Fixtures for the LoRA tools: tiny diffusers-layout Wan transformers written to disk, sharded."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch


def tiny_transformer(width: int = 16, seed: int = 0, image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=width // 2, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", image_dim=image_dim, added_kv_proj_dim=width if image_dim else None,
        rope_max_seq_len=32,
    ).eval()


def write_model(
    folder: Path,
    *,
    width: int = 16,
    experts: int = 1,
    seed: int = 0,
    edit: Callable[[str, dict], None] | None = None,
    image_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A model folder with transformer/ (and transformer_2/), sharded into several files.

    `edit(component, state_dict)` may change tensors in place before saving (to make a fine-tune).
    """
    folder.mkdir(parents=True)
    for index, component in enumerate(("transformer", "transformer_2")[:experts]):
        model = tiny_transformer(width, seed + index, image_dim)
        if dtype != torch.float32:
            model = model.to(dtype)
        if edit is not None:
            state = model.state_dict()
            with torch.no_grad():
                edit(component, state)
        model.save_pretrained(folder / component, max_shard_size="20KB")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text("{}")
    return folder


@pytest.fixture
def model_factory(tmp_path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(**kwargs) -> Path:
        return write_model(tmp_path / f"model{next(counter)}", **kwargs)

    return make
