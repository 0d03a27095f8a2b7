"""The size check before a model loads: which files it reads, and one line per kind of damage."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.models.detect import ModelInfo
from engine.models.headers import check_complete
from engine.models.load import weight_files
from engine.types import RequestError


def _tensors(path: Path, n: int = 2) -> Path:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"w{i}": torch.ones(4, 4) for i in range(n)}, str(path))
    return path


def test_a_complete_file_passes_and_each_damage_is_named_with_the_fix(tmp_path):
    good = _tensors(tmp_path / "good.safetensors")
    check_complete(good)
    size = good.stat().st_size
    data = good.read_bytes()
    cases = {
        "cut.safetensors": (data[:-10], f"is truncated or not a safetensors file (expected {size} bytes, found "
                                        f"{size - 10}); download it again"),
        "longer.safetensors": (data + b"xx", f"is damaged or not a safetensors file (expected {size} bytes, found "
                                            f"{size + 2}); download it again"),
        "header-cut.safetensors": (data[:20], "is truncated or not a safetensors file (expected at least "),
        "garbage.safetensors": (os.urandom(size), f"is not a safetensors file (no valid header, {size} bytes); "
                                                  "download it again"),
        "empty.safetensors": (b"", "is not a safetensors file (no valid header, 0 bytes)"),
        "bad-json.safetensors": ((12).to_bytes(8, "little") + b"{not json!!}", "its header is damaged"),
    }
    for name, (raw, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(RequestError) as err:
            check_complete(path)
        assert str(err.value).startswith(str(path)) and message in str(err.value), (name, str(err.value))
    with pytest.raises(RequestError, match="is missing; download it again"):
        check_complete(tmp_path / "gone.safetensors")


def test_weight_files_are_those_the_loaders_read(tmp_path):
    root = tmp_path / "model"
    (root / "scheduler").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "transformer_2": [None, None]}))
    t = _tensors(root / "transformer" / "diffusion_pytorch_model.safetensors")
    _tensors(root / "transformer" / "diffusion_pytorch_model.fp16.safetensors")  # a variant: not loaded
    shards = [_tensors(root / "text_encoder" / f"model-0000{i}-of-00002.safetensors") for i in (1, 2)]
    (root / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": shards[0].name, "b": shards[1].name, "c": shards[1].name}}))
    (root / "vae").mkdir()
    (root / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "vae-1.safetensors"}}))  # a shard that is not there: listed, so it is named
    folder = ModelInfo("model", str(root), "wan2.1-t2v-1.3b", True)
    assert weight_files(folder) == [t, *shards, root / "vae" / "vae-1.safetensors"]

    single = _tensors(tmp_path / "single.safetensors")
    recipe = ModelInfo("r", str(tmp_path / "r.json"), "wan2.1-t2v-1.3b", True, source="recipe", files={
        "transformer": str(single), "text_encoder": str(root / "text_encoder"),
        "tokenizer": f"{single}#spiece_model", "vae": None, "gguf": str(tmp_path / "x.gguf")})
    assert weight_files(recipe) == [single, *shards]
