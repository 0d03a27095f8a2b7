"""`python -m engine lora inspect|merge`: JSON contract, baking into the right expert, bad files, no partial output."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from engine.__main__ import main
from lora_factory import random_lowrank, tiny_transformer, write_lora

A14B = "wan2.2-t2v-a14b"


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _tree_hash(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def high_lora(tmp_path):
    return write_lora(tmp_path / "speed_high.safetensors", "wan", random_lowrank(tiny_transformer(width=32)), alpha=2.0)


def test_inspect_json_with_model_coverage(demo_model, high_lora, capsys):
    model = demo_model(A14B)
    code, out, err = _run(capsys, "lora", "inspect", str(high_lora), "--model", str(model), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == "Wan/ComfyUI" and info["rank"] == 4 and info["alpha"] == 2.0
    assert info["family"] == "demo Wan 14B" and info["expert_hint"] == "high_noise"
    assert info["compatible"] is True
    assert info["coverage"]["applied"] == info["coverage"]["total"]
    assert set(info["coverage_by_expert"]) == {"high_noise", "low_noise"}


def test_inspect_wrong_base_says_which_family(demo_model, high_lora, capsys):
    model = demo_model("wan2.2-ti2v-5b")
    code, out, _ = _run(capsys, "lora", "inspect", str(high_lora), "--model", str(model), "--json")
    info = json.loads(out)
    assert code == 0 and info["compatible"] is False
    assert "made for demo Wan 14B (width 32); this model is Demo Wan2.2 TI2V 5B" in info["reason"]


def test_merge_bakes_into_the_named_expert_only(demo_model, high_lora, tmp_path, capsys):
    from diffusers import WanTransformer3DModel

    from engine.models.catalog import get_spec
    from engine.lora import LoraManager
    from engine.types import LoraEntry, Stack

    src = demo_model(A14B)
    before = _tree_hash(src)
    out = tmp_path / "merged"
    code, stdout, err = _run(capsys, "lora", "merge", "--model", str(src), "--lora", f"{high_lora}=0.8,high_noise",
                             "--out", str(out), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["loras"][0]["status"] == "applied"
    assert report["loras"][0]["weights"] == {"high_noise": 0.8, "low_noise": 0.0}
    assert _tree_hash(src) == before  # the source is never written
    from engine.models.detect import detect

    assert detect(out).ok and detect(out).type == "demo-" + A14B
    # High-noise expert: equal to the same application done in memory; low-noise: unchanged.
    want = WanTransformer3DModel.from_pretrained(src, subfolder="transformer")
    LoraManager(tmp_path).apply({"high_noise": want}, get_spec("demo-" + A14B),
                                Stack((LoraEntry("speed_high.safetensors", 0.8, "high_noise"),)))
    got = WanTransformer3DModel.from_pretrained(out, subfolder="transformer")
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in got.state_dict().items())
    low_src = WanTransformer3DModel.from_pretrained(src, subfolder="transformer_2").state_dict()
    low_out = WanTransformer3DModel.from_pretrained(out, subfolder="transformer_2").state_dict()
    assert all(torch.equal(v, low_src[k]) for k, v in low_out.items())
    assert not all(torch.equal(v, low_src[k]) for k, v in got.state_dict().items())
    # Never overwrite: a second merge into the same folder is refused.
    code, _, err = _run(capsys, "lora", "merge", "--model", str(src), "--lora", str(high_lora), "--out", str(out))
    assert code != 0 and "already exists" in err


@pytest.mark.parametrize("case", ["empty", "truncated", "text", "nan", "nokeys", "wrongbase"])
def test_merge_bad_lora_one_line_nonzero_no_output(demo_model, high_lora, tmp_path, capsys, case):
    src = demo_model("wan2.1-t2v-1.3b")
    capsys.readouterr()  # building the session's demo model may print progress bars
    bad = tmp_path / f"{case}.safetensors"
    if case == "empty":
        bad.write_bytes(b"")
    elif case == "truncated":
        bad.write_bytes(high_lora.read_bytes()[:-64])
    elif case == "text":
        bad.write_text("this is not a LoRA")
    elif case == "nan":
        save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.full((4, 16), float("inf")),
                   "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(16, 4)}, str(bad))
    elif case == "nokeys":
        save_file({"cond_stage_model.weight": torch.zeros(4)}, str(bad))
    else:
        bad = high_lora  # width 32 LoRA on the width 16 model
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "lora", "merge", "--model", str(src), "--lora", str(bad), "--out", str(out))
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert bad.name in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
