"""Format matrix: every key family, on each demo architecture, applies with full coverage and equals the formula."""
from __future__ import annotations

import pytest
import torch

from engine.models.catalog import get_spec
from engine.lora import LoraManager
from engine.types import LoraEntry, Stack
from lora_factory import (
    expected, lightx2v_diffs, random_lowrank, snapshot, tiny_transformer, write_lightx2v, write_lora,
)

ARCHS = {
    "demo-wan2.1-t2v-1.3b": dict(width=16, in_channels=16),
    "demo-wan2.2-ti2v-5b": dict(width=24, in_channels=48),
    "demo-wan2.1-i2v-14b": dict(width=32, in_channels=36, image=True),
}
# family -> (alpha written in the file, scale the engine must use; rank is 4)
FAMILIES = {"peft": (None, 1.0), "wan": (2.0, 0.5), "kohya": (8.0, 2.0), "kohya_transformer": (4.0, 1.0)}


def _apply(tmp_path, model, arch, file, weight):
    mgr = LoraManager(tmp_path)
    res = mgr.apply({"single": model}, get_spec(arch), Stack((LoraEntry(file, weight=weight),)))
    return mgr, res[0]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lowrank_family_full_coverage_and_formula(tmp_path, arch, family):
    model = tiny_transformer(**ARCHS[arch])
    w0 = snapshot(model)
    lowrank = random_lowrank(model)
    alpha, scale = FAMILIES[family]
    write_lora(tmp_path / "x.safetensors", family, lowrank, alpha=alpha)
    mgr, row = _apply(tmp_path, model, arch, "x.safetensors", 0.7)
    cov = row["coverage"]
    assert row["status"] == "applied", row
    assert cov["applied"] == cov["total"] == len(lowrank) * (2 if alpha is None else 3), cov
    assert not cov["skipped"] and not cov["unmatched"] and not cov["shape_mismatch"]
    want = expected(w0, [(lowrank, 0.7, scale)])
    got = model.state_dict()
    for name, value in want.items():
        assert torch.allclose(got[name], value, rtol=1e-5, atol=1e-6), name
    untouched = set(w0) - set(want)
    assert all(torch.equal(got[n], w0[n]) for n in untouched)
    mgr.restore()
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lightx2v_diffs_cover_every_parameter(tmp_path, arch):
    model = tiny_transformer(**ARCHS[arch])
    w0 = snapshot(model)
    diffs = lightx2v_diffs(model)
    write_lightx2v(tmp_path / "d.safetensors", diffs)
    mgr, row = _apply(tmp_path, model, arch, "d.safetensors", 1.5)
    cov = row["coverage"]
    assert cov["applied"] == cov["total"] == len(diffs), cov
    want = expected(w0, [], [(diffs, 1.5)])
    got = model.state_dict()
    for name, value in want.items():
        assert torch.allclose(got[name], value, rtol=1e-6, atol=1e-7), name
    mgr.restore()
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


def test_peft_alpha_from_metadata_and_lora_bias(tmp_path):
    """diffusers writes r/lora_alpha into the metadata; PEFT lora_B.bias adds to the layer bias."""
    import json

    from safetensors.torch import save_file

    model = tiny_transformer()
    w0 = snapshot(model)
    lowrank = random_lowrank(model, targets=["blocks.0.attn1.to_q"])
    down, up = lowrank["blocks.0.attn1.to_q"]
    bias = torch.randn(16) * 0.1
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": down,
               "transformer.blocks.0.attn1.to_q.lora_B.weight": up,
               "transformer.blocks.0.attn1.to_q.lora_B.bias": bias},
              str(tmp_path / "p.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})})
    _, row = _apply(tmp_path, model, "demo-wan2.1-t2v-1.3b", "p.safetensors", 1.0)
    assert row["coverage"]["applied"] == 3
    want = expected(w0, [(lowrank, 1.0, 2.0)], [({"blocks.0.attn1.to_q.bias": bias}, 1.0)])
    got = model.state_dict()
    for name, value in want.items():
        assert torch.allclose(got[name], value, rtol=1e-5, atol=1e-6), name


def test_i2v_lora_on_t2v_model_skips_image_keys_with_reason(tmp_path):
    i2v = tiny_transformer(width=16, in_channels=36, image=True)
    t2v = tiny_transformer(width=16)
    write_lora(tmp_path / "i2v.safetensors", "wan", random_lowrank(i2v), alpha=4.0)
    _, row = _apply(tmp_path, t2v, "demo-wan2.1-t2v-1.3b", "i2v.safetensors", 1.0)
    cov = row["coverage"]
    assert cov["skipped"] and all("image" in line for line in cov["skipped"]), cov["skipped"][:3]
    # The I2V patch embedding takes 36 input channels, the T2V one 16: reported, not forced.
    assert cov["shape_mismatch"] and all("patch_embedding" in line for line in cov["shape_mismatch"])
    assert cov["applied"] + len(cov["skipped"]) + len(cov["shape_mismatch"]) == cov["total"]
    assert not cov["unmatched"]


def test_unknown_keys_are_reported_not_dropped(tmp_path):
    from safetensors.torch import save_file

    model = tiny_transformer()
    lowrank = random_lowrank(model, targets=["blocks.0.attn1.to_q"])
    sd = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": lowrank["blocks.0.attn1.to_q"][0],
          "diffusion_model.blocks.0.self_attn.q.lora_up.weight": lowrank["blocks.0.attn1.to_q"][1],
          "diffusion_model.blocks.9.self_attn.q.lora_down.weight": torch.zeros(4, 16),
          "diffusion_model.blocks.9.self_attn.q.lora_up.weight": torch.zeros(16, 4),
          "diffusion_model.some_future_layer.lora_down.weight": torch.zeros(4, 16),
          "text_encoder.foo.weight": torch.zeros(2)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    _, row = _apply(tmp_path, model, "demo-wan2.1-t2v-1.3b", "m.safetensors", 1.0)
    cov = row["coverage"]
    assert cov["total"] == len(sd)
    assert cov["applied"] == 2
    assert len(cov["unmatched"]) + len(cov["skipped"]) == 4
    assert any("block 9 does not exist" in line for line in cov["unmatched"])


@pytest.mark.parametrize("family", ["wan", "kohya_transformer"])
def test_two_expert_prefixes_route_the_second_part_to_low_noise(tmp_path, family):
    from lora_factory import write_two_expert

    high_m, low_m = tiny_transformer(width=32, seed=0), tiny_transformer(width=32, seed=1)
    h0, l0 = snapshot(high_m), snapshot(low_m)
    high_part, low_part = random_lowrank(high_m, seed=5), random_lowrank(low_m, seed=6)
    write_two_expert(tmp_path / "pair.safetensors", high_part, low_part, family=family, alpha=8.0)
    mgr = LoraManager(tmp_path)
    res = mgr.apply({"high_noise": high_m, "low_noise": low_m}, get_spec("demo-wan2.2-t2v-a14b"),
                    Stack((LoraEntry("pair.safetensors", weight=1.0),)))
    cov = res[0]["coverage"]
    assert cov["applied"] == cov["total"] == 3 * (len(high_part) + len(low_part))
    for model, ref, part in ((high_m, h0, high_part), (low_m, l0, low_part)):
        want = expected(ref, [(part, 1.0, 2.0)])
        for name, value in want.items():
            assert torch.allclose(model.state_dict()[name], value, rtol=1e-5, atol=1e-6), name
    info = {r["file"]: r for r in mgr.list_loras(get_spec("demo-wan2.1-t2v-14b"))}["pair.safetensors"]
    assert info["two_expert"] and info["compatible"] and "only its high-noise part" in info["reason"]


@pytest.mark.parametrize("name,hint", [("speed_HN.safetensors", "high_noise"), ("x-low_noise-v2.safetensors", "low_noise"),
                                        ("wan_high.safetensors", "high_noise"), ("lofi_style.safetensors", None),
                                        ("highway.safetensors", None)])
def test_expert_hint_from_file_name(name, hint):
    from engine.lora.inspection import expert_hint

    assert expert_hint(name) == hint
