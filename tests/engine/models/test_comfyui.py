"""--comfyui scanning and detection on a tree of tiny files in the real layouts; each broken tree gets its reason."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _by_id(models):
    return {m.id: m for m in models}


def test_every_file_is_classified_with_type_and_storage(comfy_tree):
    from engine.models.identify import classify_file

    got = {p.name: classify_file(p) for p in comfy_tree.rglob("*") if p.suffix in (".safetensors", ".gguf")
           and "loras" not in p.parts}
    high = got["wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"]
    assert (high.kind, high.arch, high.expert, high.storage, high.demo) == (
        "transformer", "wan2.2-t2v-a14b", "high_noise", "fp8_scaled", True)
    assert got["wan2.2_t2v_low_noise_14B_fp8_e4m3fn.safetensors"].storage == "fp8_e4m3fn"
    assert got["wan2.2_t2v_low_noise_14B_bf16.safetensors"].storage == "bf16"
    assert got["wan2.2_t2v_high_noise-14B-Q4_0.gguf"].storage == "gguf-Q4_0"
    assert got["wan2.2_t2v_high_noise-14B-Q8_0.gguf"].expert == "high_noise"
    assert (got["umt5_xxl_fp32.safetensors"].kind, got["umt5_xxl_fp32.safetensors"].arch) == ("text_encoder", "umt5")
    assert (got["wan_2.1_vae.safetensors"].kind, got["wan_2.1_vae.safetensors"].arch) == ("vae", "wan2.1")
    assert all(not k.reason for k in got.values())


def test_detection_names_every_type_from_single_files(tmp_path):
    """Shapes decide: in_channels 16/36/48, width, the Wan2.1 I2V image branch, and high/low in the name."""
    import torch

    from engine.models.demo import _transformer
    from engine.models.identify import classify_file
    from engine.models.testdata import write_transformer

    torch.manual_seed(0)
    cases = {  # file name, (arch, width, image_dim) -> expected type
        "wan2.1_t2v_1.3B_bf16.safetensors": (("wan2.1-t2v-1.3b", 16, None), "wan2.1-t2v-1.3b"),
        "wan2.1_t2v_14B_bf16.safetensors": (("wan2.1-t2v-14b", 32, None), "wan2.1-t2v-14b"),
        "wan2.1_i2v_480p_14B_bf16.safetensors": (("wan2.1-i2v-14b", 32, 32), "wan2.1-i2v-14b"),
        "wan2.2_i2v_low_noise_14B_bf16.safetensors": (("wan2.2-i2v-a14b", 32, None), "wan2.2-i2v-a14b"),
        "wan2.2_t2v_high_noise_14B_bf16.safetensors": (("wan2.2-t2v-a14b", 32, None), "wan2.2-t2v-a14b"),
        "wan2.2_ti2v_5B_bf16.safetensors": (("wan2.2-ti2v-5b", 24, None), "wan2.2-ti2v-5b"),
    }
    for i, (name, ((arch, width, image_dim), expected)) in enumerate(cases.items()):
        prefix = ("", "model.diffusion_model.", "diffusion_model.")[i % 3]
        path = write_transformer(_transformer(arch, width, image_dim), tmp_path / name, "bf16", prefix)
        kind = classify_file(path)
        assert (kind.kind, kind.arch, kind.demo, kind.reason) == ("transformer", expected, True, ""), name


def test_unusable_files_get_reasons(tmp_path):
    from safetensors.torch import save_file
    import torch

    from engine.models.identify import classify_file

    (tmp_path / "empty.safetensors").write_bytes(b"")
    save_file({"blocks.0.self_attn.q.weight._data": torch.zeros(2, 2, dtype=torch.int8),
               "patch_embedding.weight": torch.zeros(32, 16, 1, 2, 2)}, str(tmp_path / "x_quanto_int8.safetensors"))
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    assert "empty" in classify_file(tmp_path / "empty.safetensors").reason
    assert "quanto" in classify_file(tmp_path / "x_quanto_int8.safetensors").reason
    assert "not a Wan transformer, VAE" in classify_file(tmp_path / "other.safetensors").reason


def test_scan_assembles_pairs_with_storage_files_and_label(comfy_tree):
    from engine.models.comfyui import scan_comfyui

    models = _by_id(scan_comfyui(comfy_tree))
    m = models["wan2.2_t2v_14B_fp8_scaled"]
    assert m.ok and m.type == "demo-wan2.2-t2v-a14b" and m.source == "comfyui"
    assert m.storage == "fp8_scaled" and m.storage_label == "fp8 scaled · 2 experts"
    assert Path(m.files["transformer"]).name == "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
    assert Path(m.files["transformer_2"]).name == "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
    assert Path(m.files["text_encoder"]).name == "umt5_xxl_fp32.safetensors"
    assert Path(m.files["vae"]).name == "wan_2.1_vae.safetensors"
    assert m.files["tokenizer"] == str(comfy_tree / "text_encoders" / "tokenizer")
    assert models["wan2.2_t2v-14B-Q4_0"].storage_label == "GGUF Q4_0 · 2 experts"
    assert {"wan2.2_t2v_14B_fp32", "wan2.2_t2v_14B_bf16", "wan2.2_t2v_14B_fp8_e4m3fn", "wan2.2_t2v-14B-Q8_0",
            "wan2.2_t2v-14B-Q5_1"} <= {k for k, v in models.items() if v.ok}


def test_broken_trees_get_their_reason(tree_copy):
    from engine.models.demo import _vae
    from engine.models.comfyui import scan_comfyui
    from engine.models.testdata import write_vae

    (tree_copy / "diffusion_models" / "wan2.2_t2v_low_noise_14B_bf16.safetensors").unlink()
    (tree_copy / "vae" / "wan_2.1_vae.safetensors").unlink()
    write_vae(_vae(True), tree_copy / "vae" / "wan2.2_vae.safetensors")  # the wrong VAE for A14B
    models = _by_id(scan_comfyui(tree_copy))
    lone = models["wan2.2_t2v_high_noise_14B_bf16"]
    assert not lone.ok and "no low_noise partner for wan2.2_t2v_high_noise_14B_bf16.safetensors" in lone.reason
    fp32 = models["wan2.2_t2v_14B_fp32"]
    assert not fp32.ok and "no Wan 2.1 VAE (wan_2.1_vae.safetensors)" in fp32.reason and "vae/" in fp32.reason

    for p in (tree_copy / "text_encoders").glob("umt5*"):
        p.unlink()
    assert "no umt5-xxl text encoder" in _by_id(scan_comfyui(tree_copy))["wan2.2_t2v_14B_fp32"].reason


def test_missing_tokenizer_names_what_to_put_where(tree_copy):
    import shutil

    from engine.models.comfyui import scan_comfyui

    shutil.rmtree(tree_copy / "text_encoders" / "tokenizer")
    m = _by_id(scan_comfyui(tree_copy))["wan2.2_t2v_14B_bf16"]
    assert not m.ok and "no tokenizer for umt5_xxl_fp32.safetensors" in m.reason and "tokenizer/" in m.reason


def test_not_a_comfyui_folder(tmp_path):
    from engine.models.comfyui import check_root
    from engine.types import RequestError

    with pytest.raises(RequestError, match="none of diffusion_models/"):
        check_root(tmp_path)
    with pytest.raises(RequestError, match="is not a folder"):
        check_root(tmp_path / "nope")


def test_models_cli_json_rows(comfy_tree, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "engine", "models", "--models-dir", str(tmp_path), "--comfyui",
                          str(comfy_tree), "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {r["id"]: r for r in json.loads(out.stdout)["models"]}
    row = rows["wan2.2_t2v-14B-Q8_0"]
    assert (row["source"], row["storage"], row["ok"]) == ("comfyui", "gguf-Q8_0", True)
    assert set(row["files"]) == {"transformer", "transformer_2", "text_encoder", "vae", "tokenizer"}
    bad = subprocess.run([sys.executable, "-m", "engine", "models", "--comfyui", str(tmp_path / "nope")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --comfyui") and "Traceback" not in bad.stderr
