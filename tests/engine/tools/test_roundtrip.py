"""Round trips through the real commands: merge a known rank-r LoRA, extract it back; merge == in-place apply."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.__main__ import main
from engine.lora.shards import TensorReader

RANK, ALPHA, WEIGHT = 3, 6.0, 0.7
MODULES = {  # Wan name -> (diffusers name, out, in) on the 1.3B demo (width 16, ffn 32)
    "self_attn.q": ("attn1.to_q", 16, 16),
    "cross_attn.v": ("attn2.to_v", 16, 16),
    "ffn.0": ("ffn.net.0.proj", 32, 16),
    "ffn.2": ("ffn.net.2", 16, 32),
}


def known_lora(path) -> dict[str, torch.Tensor]:
    """A Wan/ComfyUI LoRA with a known rank-3 delta per layer; returns the expected delta per diffusers weight."""
    g = torch.Generator().manual_seed(7)
    sd, expected = {}, {}
    for block in range(2):
        for wan, (diffusers, out_f, in_f) in MODULES.items():
            down = torch.randn(RANK, in_f, generator=g) * 0.3
            up = torch.randn(out_f, RANK, generator=g) * 0.3
            key = f"diffusion_model.blocks.{block}.{wan}"
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = torch.tensor(ALPHA)
            expected[f"blocks.{block}.{diffusers}.weight"] = WEIGHT * (ALPHA / RANK) * (up @ down)
    save_file(sd, str(path))
    return expected


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture
def merged(demo_model, tmp_path, capsys):
    model = demo_model("wan2.1-t2v-1.3b")
    lora = tmp_path / "known.safetensors"
    expected = known_lora(lora)
    out = tmp_path / "merged"
    report = json.loads(run(capsys, "lora", "merge", "--model", model, "--lora", f"{lora}={WEIGHT}", "--out", out, "--json"))
    return model, lora, out, expected, report


@pytest.mark.slow
def test_merge_then_extract_recovers_the_known_delta(merged, tmp_path, capsys):
    model, _lora, out, expected, _report = merged
    extracted = tmp_path / "extracted.safetensors"
    report = json.loads(run(capsys, "lora", "extract", "--source", model, "--target", out, "--rank", RANK,
                            "--dtype", "fp32", "--out", extracted, "--json"))
    assert report["layers_lora"] == len(expected) and report["layers_diff"] == 0 and report["biases"] == 0

    with safe_open(str(extracted), framework="pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    errors = {}
    for name, want in expected.items():
        module = name.removesuffix(".weight")
        down, up = got[f"transformer.{module}.lora_A.weight"], got[f"transformer.{module}.lora_B.weight"]
        scale = got[f"transformer.{module}.alpha"].item() / down.shape[0]
        delta = scale * (up @ down)
        errors[name] = (torch.linalg.norm(delta - want) / torch.linalg.norm(want)).item()
    assert max(errors.values()) < 1e-3, errors


@pytest.mark.slow
def test_merge_output_equals_in_place_application(merged):
    from diffusers import WanTransformer3DModel

    from engine.models.catalog import get_spec
    from engine.lora.manager import LoraManager
    from engine.types import LoraEntry, Stack

    model, lora, out, expected, _report = merged
    module = WanTransformer3DModel.from_pretrained(model, subfolder="transformer")
    manager = LoraManager(lora.parent)
    stack = Stack((LoraEntry(file=str(lora), weight=WEIGHT),))
    manager.apply({"single": module}, get_spec("demo-wan2.1-t2v-1.3b"), stack, resolve=lambda f: lora)
    live = module.state_dict()
    with TensorReader(out / "transformer") as merged_weights:
        assert sorted(merged_weights.keys()) == sorted(live)
        for name in merged_weights.keys():
            assert torch.equal(merged_weights.get(name), live[name]), name
    changed = [n for n in expected if not torch.equal(live[n], WanTransformer3DModel.from_pretrained(
        model, subfolder="transformer").state_dict()[n])]
    assert sorted(changed) == sorted(expected)
