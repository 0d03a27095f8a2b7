"""The done-when commands on a ComfyUI-style tree of tiny files: generate writes a playable MP4 and reports
each LoRA as merged (fp8 experts) or runtime (GGUF experts) with its coverage."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]


def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.mark.parametrize("model, mode", [("wan2.2_t2v_14B_fp8_scaled", "merged"), ("wan2.2_t2v-14B-Q8_0", "runtime")])
def test_generate_from_comfyui_with_loras(comfy_tree, tmp_path, model, mode):
    import imageio.v3 as iio

    lora = comfy_tree / "loras" / "demo" / "anime-a14b-peft.safetensors"
    out = tmp_path / "x.mp4"
    res = _run("generate", "--comfyui", str(comfy_tree), "--models-dir", str(tmp_path), "--model", model,
               "--prompt", "a cat", "--lora", f"{lora}=0.8", "--steps", "2", "--out", str(out), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    [row] = summary["loras"]
    assert row["status"] == "applied" and row["mode"] == mode and row["coverage"]["applied"] == row["coverage"]["total"] > 0
    frames = iio.imread(out)
    assert frames.shape[0] == summary["frames"] == 9


def test_generate_names_the_unusable_model(comfy_tree, tmp_path):
    res = _run("generate", "--comfyui", str(comfy_tree), "--models-dir", str(tmp_path), "--model", "nope",
               "--prompt", "a cat", "--out", str(tmp_path / "x.mp4"), cwd=tmp_path)
    assert res.returncode == 2 and "no such folder, recipe or model id" in res.stderr and "wan2.2_t2v_14B_fp32" in res.stderr


def test_generate_from_a_recipe_file(comfy_tree, tmp_path):
    dm = comfy_tree / "diffusion_models"
    recipe = tmp_path / "recipes" / "fp8.json"
    recipe.parent.mkdir()
    recipe.write_text(json.dumps({
        "schema": 1, "transformer": str(dm / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"),
        "transformer_2": str(dm / "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"),
        "text_encoder": str(comfy_tree / "text_encoders" / "umt5_xxl_fp32.safetensors"),
        "vae": str(comfy_tree / "vae" / "wan_2.1_vae.safetensors")}))
    out = tmp_path / "r.mp4"
    res = _run("generate", "--model", str(recipe), "--prompt", "a cat", "--steps", "2", "--out", str(out), "--json",
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["frames"] == 9 and out.stat().st_size > 0
