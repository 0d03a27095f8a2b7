"""Reading LoRA files: pickle refusal, DoRA, damaged files, metadata; W0 re-read from the model's own files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.models.catalog import get_spec
from engine.lora import LoraFormatError, LoraManager
from engine.lora.files import read_lora_file
from engine.types import LoraEntry, Stack
from lora_factory import random_lowrank, snapshot, tiny_transformer, write_lora


def _sd(model):
    down, up = random_lowrank(model, targets=["blocks.0.attn1.to_q"])["blocks.0.attn1.to_q"]
    return {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up}


def test_pickle_is_refused_unless_opted_in_then_weights_only(tmp_path):
    model = tiny_transformer()
    torch.save(_sd(model), tmp_path / "old.pt")
    with pytest.raises(LoraFormatError, match=r"pickle .*convert it to \.safetensors"):
        LoraManager(tmp_path).load(tmp_path / "old.pt")
    parsed = LoraManager(tmp_path, allow_pickle=True).load(tmp_path / "old.pt")
    assert parsed.patches("main")[0].target == "blocks.0.attn1.to_q.weight"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(LoraFormatError, match="weights_only"):
        LoraManager(tmp_path, allow_pickle=True).load(tmp_path / "evil.pt")


def test_dora_scale_is_read_as_dora(tmp_path):  # issue 11: DoRA is merged exactly (tests/engine/lora/test_layouts.py)
    sd = _sd(tiny_transformer())
    sd["diffusion_model.blocks.0.self_attn.q.dora_scale"] = torch.ones(1, 16)
    save_file(sd, str(tmp_path / "dora.safetensors"))
    parsed = LoraManager(tmp_path).load(tmp_path / "dora.safetensors")
    assert [p.kind for p in parsed.slots["main"]["blocks.0.attn1.to_q.weight"]] == ["dora"]


@pytest.mark.parametrize("case,match", [
    ("empty", "is empty"),
    ("text", "not a safetensors file"),
    ("truncated", "truncated"),
    ("nan", "NaN or Inf"),
    ("nokeys", "no recognisable Wan LoRA keys"),
])
def test_bad_files_get_one_clear_message(tmp_path, case, match):
    path = tmp_path / f"{case}.safetensors"
    good = tmp_path / "good.safetensors"
    save_file(_sd(tiny_transformer()), str(good))
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("<html>404 not found</html>")
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[:-100])
    elif case == "nan":
        sd = _sd(tiny_transformer())
        next(iter(sd.values()))[0, 0] = float("nan")
        save_file(sd, str(path))
    else:
        save_file({"model.text_encoder.layer.weight": torch.zeros(3)}, str(path))
    with pytest.raises(LoraFormatError, match=match) as info:
        LoraManager(tmp_path).load(path)
    assert "\n" not in str(info.value)


def test_metadata_trigger_words_rank_and_expert_hint(tmp_path):
    model = tiny_transformer(width=32)
    path = write_lora(tmp_path / "anime_HN.safetensors", "wan", random_lowrank(model, rank=4), alpha=4.0)
    sd = read_lora_file(path).tensors
    save_file(sd, str(path), metadata={
        "ss_tag_frequency": json.dumps({"img": {"anime style": 10, "1girl": 3}}),
        "ss_base_model_version": "wan2.1_t2v_14B", "ss_network_dim": "4"})
    info = LoraManager(tmp_path).inspect("anime_HN.safetensors")
    assert info["trigger_words"][:2] == ["anime style", "1girl"]
    assert info["base_model"] == "wan2.1_t2v_14B"
    assert info["rank"] == 4 and info["alpha"] == 4.0
    assert info["width"] == 32 and info["family"] == "demo Wan 14B"
    assert info["expert_hint"] == "high_noise"
    assert info["format"] == "Wan/ComfyUI" and info["dtype"] == "float32"
    assert info["size_bytes"] == path.stat().st_size and len(info["sha256"]) == 64
    assert info["apply_memory_bytes"] >= info["tensor_bytes"] > 0


def test_w0_is_reread_from_the_models_own_safetensors(tmp_path):
    """A model loaded from a folder keeps no copies: W0 comes back from its files, bit for bit."""
    from diffusers import WanTransformer3DModel

    root = tmp_path / "model"
    tiny_transformer(width=32, seed=0).save_pretrained(root / "transformer")
    tiny_transformer(width=32, seed=1).save_pretrained(root / "transformer_2")
    high = WanTransformer3DModel.from_pretrained(root, subfolder="transformer")
    low = WanTransformer3DModel.from_pretrained(root, subfolder="transformer_2")
    h0, l0 = snapshot(high), snapshot(low)
    loras = tmp_path / "loras"
    loras.mkdir()
    write_lora(loras / "x.safetensors", "peft", random_lowrank(high))
    mgr = LoraManager(loras)
    experts = {"high_noise": high, "low_noise": low}
    spec = get_spec("demo-wan2.2-t2v-a14b")
    mgr.apply(experts, spec, Stack((LoraEntry("x.safetensors", 1.0),)))
    for name in ("high_noise", "low_noise"):
        stats = mgr.last_stats["experts"][name]
        assert stats["file_backed"] == stats["written"] > 0 and stats["originals_bytes"] == 0, stats
    mgr.apply(experts, spec, Stack((LoraEntry("x.safetensors", -0.3),)))  # re-merge from W0 read back from disk
    fresh = WanTransformer3DModel.from_pretrained(root, subfolder="transformer")
    fresh_low = WanTransformer3DModel.from_pretrained(root, subfolder="transformer_2")
    LoraManager(loras).apply({"high_noise": fresh, "low_noise": fresh_low}, spec, Stack((LoraEntry("x.safetensors", -0.3),)))
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in high.state_dict().items())
    mgr.restore()
    assert all(torch.equal(v, h0[k]) for k, v in high.state_dict().items())
    assert all(torch.equal(v, l0[k]) for k, v in low.state_dict().items())
