"""The lean merge writer: streamed shards, linked unchanged files, temp folder + rename, no partial output."""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from engine.lora import rewrite, shards
from engine.lora.shards import TensorReader
from engine.types import RequestError


def add_one_to_q(component, name, w0):
    touched = component == "transformer" and name.endswith("attn1.to_q.weight")
    return w0.float() + 1.0 if touched else None


def test_bake_rewrites_touched_component_and_links_the_rest(model_factory, tmp_path):
    model = model_factory(experts=2)
    out = tmp_path / "merged"
    report = rewrite.rewrite_model(model, out, add_one_to_q, {"transformer"}, marker={"stack": []})

    assert report["rewritten"] == ["transformer"]
    assert report["changed_tensors"] == {"transformer": 2}
    assert (out / rewrite.MERGE_MARKER).is_file()
    # transformer_2, model_index.json, vae/config.json: hard links to the source files, not rewrites.
    for rel in ("transformer_2/config.json", "model_index.json", "vae/config.json"):
        assert os.path.samefile(out / rel, model / rel), rel
    for shard in (model / "transformer_2").glob("*.safetensors"):
        assert os.path.samefile(out / "transformer_2" / shard.name, shard)
    # Same sharding as the source, with an index that lists every tensor.
    assert sorted(p.name for p in (out / "transformer").glob("*.safetensors")) == \
        sorted(p.name for p in (model / "transformer").glob("*.safetensors"))
    with TensorReader(model / "transformer") as src, TensorReader(out / "transformer") as dst:
        assert dst.keys() == src.keys()
        for name in src.keys():
            want = src.get(name) + (1.0 if name.endswith("attn1.to_q.weight") else 0.0)
            assert torch.equal(dst.get(name), want), name
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_dtype_rewrites_every_expert_and_loads_in_diffusers(model_factory, tmp_path):
    from diffusers import WanTransformer3DModel

    model = model_factory(experts=2)
    out = tmp_path / "bf16"
    report = rewrite.rewrite_model(model, out, add_one_to_q, {"transformer"}, dtype="bf16")
    assert report["rewritten"] == ["transformer", "transformer_2"]
    with TensorReader(model / "transformer_2") as src, TensorReader(out / "transformer_2") as dst:
        for name in src.keys():
            assert dst.get(name).dtype == torch.bfloat16
            assert torch.equal(dst.get(name), src.get(name).bfloat16()), name
    loaded = WanTransformer3DModel.from_pretrained(out / "transformer_2", torch_dtype=torch.bfloat16)
    index = json.loads((out / "transformer_2" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in loaded.state_dict().values())


def test_refuses_output_inside_or_over_the_source(model_factory, tmp_path):
    model = model_factory()
    with pytest.raises(RequestError, match="inside the source model"):
        rewrite.rewrite_model(model, model, add_one_to_q, {"transformer"})
    with pytest.raises(RequestError, match="inside the source model"):
        rewrite.rewrite_model(model, model / "merged", add_one_to_q, {"transformer"})
    with pytest.raises(RequestError, match="contains the source model"):
        rewrite.rewrite_model(model, model.parent, add_one_to_q, {"transformer"})
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    with pytest.raises(RequestError, match="already exists and is not empty"):
        rewrite.rewrite_model(model, busy, add_one_to_q, {"transformer"})
    assert (busy / "x").read_text() == "keep me"


def test_disk_full_leaves_no_partial_folder(model_factory, tmp_path, monkeypatch):
    model = model_factory()
    calls = {"n": 0}
    real_write = shards.ShardWriter.write

    def write_then_fail(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, name, tensor)

    monkeypatch.setattr(shards.ShardWriter, "write", write_then_fail)
    out = tmp_path / "out" / "merged"
    with pytest.raises(RequestError, match="disk full while writing .*nothing was left behind"):
        rewrite.rewrite_model(model, out, add_one_to_q, {"transformer"})
    assert calls["n"] == 5
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []
