"""`python -m engine lora convert|extract` on the demo models: contracts, coverage, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from engine.__main__ import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def inspect_json(capsys, file, model) -> dict:
    code, out, err = run(capsys, "lora", "inspect", file, "--model", model, "--json")
    assert code == 0, err
    return json.loads(out)


def tensors(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
@pytest.mark.parametrize("arch, lora", [
    ("wan2.1-t2v-1.3b", "demo/style-peft.safetensors"),
    ("wan2.1-t2v-1.3b", "demo/detail-kohya.safetensors"),
    ("wan2.2-t2v-a14b", "demo/twoexpert-a14b.safetensors"),
])
def test_comfy_output_of_convert_has_full_coverage_on_its_demo_model(capsys, tmp_path, demo_model, demo_loras_dir,
                                                                   arch, lora):
    model = demo_model(arch)
    src = demo_loras_dir / lora
    before = inspect_json(capsys, src, model)

    comfy = tmp_path / "comfy.safetensors"
    code, out, err = run(capsys, "lora", "convert", src, "--to", "comfy", "--out", comfy, "--json")
    assert code == 0, err
    assert json.loads(out)["to"] == "comfy"
    assert all(k.startswith(("diffusion_model.", "diffusion_model_2.")) for k in tensors(comfy))

    after = inspect_json(capsys, comfy, model)
    cov = after["coverage"]
    assert cov["total"] > 0 and cov["applied"] == cov["total"], cov
    assert after["naming"] == "wan" and after["compatible"]
    assert after["two_expert"] == before["two_expert"]
    for expert, c in after["coverage_by_expert"].items():
        assert c["applied"] >= before["coverage_by_expert"][expert]["applied"]


def test_extract_cli_prints_per_layer_errors_and_writes_comfy_names(capsys, tmp_path, model_factory):
    def finetune(component, state):
        g = torch.Generator().manual_seed(5)
        w = state["blocks.1.attn1.to_v.weight"]
        w += torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g)

    source = model_factory()
    target = model_factory(edit=finetune)
    out = tmp_path / "x.safetensors"
    code, text, err = run(capsys, "lora", "extract", "--source", source, "--target", target, "--rank", 2,
                          "--out", out, "--format", "comfy", "--dtype", "fp32")
    assert code == 0, err
    assert "transformer.blocks.1.attn1.to_v" in text and "rel error" in text
    assert sorted(tensors(out)) == ["diffusion_model.blocks.1.self_attn.v.alpha",
                                    "diffusion_model.blocks.1.self_attn.v.lora_down.weight",
                                    "diffusion_model.blocks.1.self_attn.v.lora_up.weight"]
    code, text, err = run(capsys, "lora", "extract", "--source", source, "--target", target, "--rank", 2,
                          "--out", tmp_path / "y.safetensors", "--json")
    report = json.loads(text)
    assert report["layers"][0]["rel_error"] < 1e-3 and report["unchanged"] > 0


@pytest.mark.parametrize("case", ["archs", "rank", "inside", "no-rank", "convert-bad-key"])
def test_bad_input_gets_one_line_and_exit_2(capsys, tmp_path, model_factory, case):
    source = model_factory(width=16)
    if case == "archs":
        argv = ["lora", "extract", "--source", source, "--target", model_factory(width=32), "--rank", 4,
                "--out", tmp_path / "x.safetensors"]
        expect = "same architecture"
    elif case == "rank":
        argv = ["lora", "extract", "--source", source, "--target", model_factory(seed=1), "--rank", 64,
                "--out", tmp_path / "x.safetensors"]
        expect = "--rank 64 is above the size of"
    elif case == "inside":
        argv = ["lora", "extract", "--source", source, "--target", model_factory(seed=1), "--rank", 4,
                "--out", source / "transformer" / "x.safetensors"]
        expect = "inside the source model folder"
    elif case == "no-rank":
        argv = ["lora", "extract", "--source", source, "--target", model_factory(seed=1), "--out", tmp_path / "x.safetensors"]
        expect = "--rank N is required"
    else:
        bad = tmp_path / "bad.safetensors"
        from safetensors.torch import save_file

        save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 16),
                   "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(16, 2),
                   "transformer.blocks.0.something_else": torch.zeros(2)}, str(bad))
        argv = ["lora", "convert", bad, "--to", "comfy", "--out", tmp_path / "x.safetensors"]
        expect = "cannot be converted"
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert out == ""
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_real_process_exit_code_and_stderr(tmp_path):
    """The module entry point itself: exit status 2 and a single stderr line, no traceback."""
    missing = tmp_path / "nope.safetensors"
    proc = subprocess.run([sys.executable, "-m", "engine", "lora", "convert", str(missing), "--to", "comfy",
                           "--out", str(tmp_path / "o.safetensors")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr
