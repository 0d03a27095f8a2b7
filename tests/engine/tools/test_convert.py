"""`lora convert`: names change both ways, tensors and metadata never do."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.lora.convert import convert_file
from engine.lora.errors import LoraFormatError
from engine.types import RequestError


def _lora_pair(g, out_f: int, in_f: int, rank: int = 4):
    return torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)


def diffusers_lora(two_experts: bool = False, dtype=torch.bfloat16) -> dict:
    """A diffusers-named LoRA touching every kind of module the name table knows, plus diffs."""
    g = torch.Generator().manual_seed(0)
    prefixes = ("lora_transformer", "lora_transformer_2") if two_experts else ("transformer",)
    modules = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "attn2.add_k_proj", "attn2.add_v_proj", "ffn.net.0.proj", "ffn.net.2"]
    sd = {}
    for prefix in prefixes:
        for block in range(2):
            for module in modules:
                a, b = _lora_pair(g, 16, 16)
                sd[f"{prefix}.blocks.{block}.{module}.lora_A.weight"] = a.to(dtype)
                sd[f"{prefix}.blocks.{block}.{module}.lora_B.weight"] = b.to(dtype)
                sd[f"{prefix}.blocks.{block}.{module}.alpha"] = torch.tensor(8.0)
            sd[f"{prefix}.blocks.{block}.attn1.to_q.diff_b"] = torch.randn(16, generator=g).to(dtype)
            sd[f"{prefix}.blocks.{block}.norm2.diff"] = torch.randn(16, generator=g).to(dtype)
            sd[f"{prefix}.blocks.{block}.scale_shift_table.diff_m"] = torch.randn(1, 6, 16, generator=g).to(dtype)
        sd[f"{prefix}.condition_embedder.text_embedder.linear_1.lora_A.weight"] = torch.randn(4, 32, generator=g).to(dtype)
        sd[f"{prefix}.condition_embedder.text_embedder.linear_1.lora_B.weight"] = torch.randn(16, 4, generator=g).to(dtype)
        sd[f"{prefix}.proj_out.diff_b"] = torch.randn(64, generator=g).to(dtype)
    return sd


def test_single_expert_names_follow_the_wan_table(tmp_path):
    sd = diffusers_lora()
    save_file(sd, str(tmp_path / "in.safetensors"))
    report = convert_file(tmp_path / "in.safetensors", "comfy", tmp_path / "out.safetensors")
    assert report["naming"] == "diffusers" and report["to"] == "comfy" and report["experts"] == ["single"]
    comfy = read(tmp_path / "out.safetensors")
    for key in (
        "diffusion_model.blocks.1.self_attn.q.lora_down.weight",
        "diffusion_model.blocks.1.self_attn.q.lora_up.weight",
        "diffusion_model.blocks.1.self_attn.q.alpha",
        "diffusion_model.blocks.0.self_attn.o.lora_down.weight",
        "diffusion_model.blocks.0.cross_attn.k.lora_down.weight",
        "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight",
        "diffusion_model.blocks.0.cross_attn.v_img.alpha",
        "diffusion_model.blocks.0.ffn.0.lora_down.weight",
        "diffusion_model.blocks.0.ffn.2.lora_up.weight",
        "diffusion_model.blocks.0.self_attn.q.diff_b",
        "diffusion_model.blocks.0.norm3.diff",  # diffusers norm2 is Wan's norm3 (cross-attention norm)
        "diffusion_model.blocks.0.diff_m",  # LightX2V layout for modulation (issue 11)
        "diffusion_model.text_embedding.0.lora_down.weight",
        "diffusion_model.head.head.diff_b",
    ):
        assert key in comfy, key
    assert len(comfy) == len(sd)
    assert torch.equal(comfy["diffusion_model.blocks.1.self_attn.q.lora_down.weight"],
                       sd["transformer.blocks.1.attn1.to_q.lora_A.weight"])


def read(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("two_experts", [False, True])
def test_diffusers_comfy_diffusers_is_identical(tmp_path, two_experts):
    sd = diffusers_lora(two_experts)
    metadata = {"ss_network_dim": "4", "note": "made by a test"}
    src = tmp_path / "lora.safetensors"
    save_file(sd, str(src), metadata=metadata)

    mid = tmp_path / "comfy.safetensors"
    report = convert_file(src, "comfy", mid)
    assert report["experts"] == (["high_noise", "low_noise"] if two_experts else ["single"])
    with safe_open(str(mid), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata() == metadata
    assert all(k.startswith("diffusion_model.") or k.startswith("diffusion_model_2.") for k in keys)
    assert any(k.startswith("diffusion_model_2.") for k in keys) == two_experts

    back = tmp_path / "back.safetensors"
    convert_file(mid, "diffusers", back)
    with safe_open(str(back), framework="pt") as f:
        assert f.metadata() == metadata
        again = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(again) == sorted(sd)
    for key, tensor in sd.items():
        assert again[key].dtype == tensor.dtype, key
        assert torch.equal(again[key], tensor), key


def test_comfy_files_with_lora_a_and_no_prefix_are_read(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {
        "diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight": torch.randn(2, 16, generator=g),
        "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight": torch.randn(16, 2, generator=g),
        "diffusion_model_2.blocks.0.ffn.0.lora_down.weight": torch.randn(2, 16, generator=g),
        "diffusion_model_2.blocks.0.ffn.0.lora_up.weight": torch.randn(32, 2, generator=g),
    }
    save_file(sd, str(tmp_path / "a.safetensors"))
    convert_file(tmp_path / "a.safetensors", "diffusers", tmp_path / "b.safetensors")
    assert sorted(read(tmp_path / "b.safetensors")) == [
        "lora_transformer.blocks.0.attn2.add_k_proj.lora_A.weight",
        "lora_transformer.blocks.0.attn2.add_k_proj.lora_B.weight",
        "lora_transformer_2.blocks.0.ffn.net.0.proj.lora_A.weight",
        "lora_transformer_2.blocks.0.ffn.net.0.proj.lora_B.weight",
    ]
    bare = {"blocks.3.self_attn.v.diff": torch.zeros(4, 4), "blocks.3.self_attn.q.diff": torch.zeros(4, 4),
            "blocks.3.norm3.diff_b": torch.zeros(4)}
    save_file(bare, str(tmp_path / "c.safetensors"))
    report = convert_file(tmp_path / "c.safetensors", "diffusers", tmp_path / "d.safetensors")
    assert report["naming"] == "wan"
    assert sorted(read(tmp_path / "d.safetensors")) == [
        "transformer.blocks.3.attn1.to_q.diff", "transformer.blocks.3.attn1.to_v.diff", "transformer.blocks.3.norm2.diff_b"]


def test_kohya_and_peft_metadata_scale_convert_too(tmp_path):
    """Reading is the engine's: kohya names convert, and a PEFT scale kept only in metadata becomes an alpha."""
    import json

    g = torch.Generator().manual_seed(2)
    kohya = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(2, 16, generator=g),
             "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(16, 2, generator=g),
             "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(1.0)}
    save_file(kohya, str(tmp_path / "k.safetensors"))
    convert_file(tmp_path / "k.safetensors", "comfy", tmp_path / "k2.safetensors")
    out = read(tmp_path / "k2.safetensors")
    assert torch.equal(out["diffusion_model.blocks.0.self_attn.q.lora_up.weight"],
                       kohya["lora_unet_blocks_0_self_attn_q.lora_up.weight"])
    peft = {"transformer.blocks.0.attn1.to_k.lora_A.weight": torch.randn(4, 16, generator=g),
            "transformer.blocks.0.attn1.to_k.lora_B.weight": torch.randn(16, 4, generator=g)}
    save_file(peft, str(tmp_path / "p.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 2})})
    report = convert_file(tmp_path / "p.safetensors", "comfy", tmp_path / "p2.safetensors")
    assert report["alpha_added"] == 1
    assert read(tmp_path / "p2.safetensors")["diffusion_model.blocks.0.self_attn.k.alpha"].item() == 2.0


def test_unconvertible_keys_are_refused_with_one_line(tmp_path):
    sd = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 16),
          "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(16, 2),
          "transformer.blocks.0.attn1.to_q.hada_w1_a": torch.zeros(2, 2)}
    save_file(sd, str(tmp_path / "x.safetensors"))
    with pytest.raises(LoraFormatError, match="1 key.* cannot be converted .*LoHa.*stops rather than drop them"):
        convert_file(tmp_path / "x.safetensors", "comfy", tmp_path / "y.safetensors")
    assert not (tmp_path / "y.safetensors").exists()
    with pytest.raises(RequestError, match="--to"):
        convert_file(tmp_path / "x.safetensors", "kohya", tmp_path / "y.safetensors")


def test_convert_refuses_to_overwrite_its_input(tmp_path):
    src = tmp_path / "a.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.diff": torch.zeros(2, 2)}, str(src))
    with pytest.raises(RequestError, match="is the input file"):
        convert_file(src, "comfy", src)
    with pytest.raises(LoraFormatError, match="not found"):
        convert_file(tmp_path / "missing.safetensors", "comfy", tmp_path / "b.safetensors")
