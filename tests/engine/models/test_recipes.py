"""Recipes: parsing with one clear message per mistake, relative paths, mixing single files with diffusers parts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("data, message", [
    ({"schema": 1}, None),  # no transformer: not a recipe at all
    ({"schema": 2, "transformer": "x.safetensors"}, "schema 2 is not supported"),
    ({"transformer": "x.safetensors", "vea": "v.safetensors"}, "unknown field(s) ['vea']"),
    ({"transformer": 3}, "`transformer` must name"),
    ({"transformer": "x.safetensors", "vae": 5}, "`vae` must be a path or null"),
    ({"transformer": "x.safetensors", "type": "wan9"}, "unknown model type 'wan9'"),
])
def test_recipe_mistakes(tmp_path, data, message):
    from engine.models.recipes import is_recipe_file, read_recipe
    from engine.types import RequestError

    path = _write(tmp_path / "r.json", data)
    if message is None:
        assert not is_recipe_file(path)
        return
    with pytest.raises(RequestError) as err:
        read_recipe(path)
    assert message in str(err.value)


def test_recipe_mixes_fp8_experts_with_a_diffusers_folders_parts(comfy_tree, demo_model, tmp_path):
    """fp8 experts from the ComfyUI tree, text encoder and VAE from a diffusers folder, tokenizer found there."""
    import shutil

    from engine.models.detect import scan

    models = tmp_path / "models"
    models.mkdir()
    demo = demo_model("wan2.2-t2v-a14b")
    (models / "demo").symlink_to(demo)
    dm = comfy_tree / "diffusion_models"
    _write(models / "mixed.json", {"schema": 1, "name": "Mixed",
                                   "transformer": str(dm / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"),
                                   "transformer_2": str(dm / "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"),
                                   "text_encoder": "demo/text_encoder", "vae": "demo", "tokenizer": None, "type": None})
    shutil.copy(dm / "wan2.2_t2v_high_noise_14B_bf16.safetensors", models / "lone_high_noise.safetensors")
    _write(models / "lone.json", {"transformer": "lone_high_noise.safetensors"})
    _write(models / "notes.json", {"anything": 1})
    found = {m.id: m for m in scan(models)}
    assert "notes" not in found
    mixed = found["mixed"]
    assert mixed.ok, mixed.reason
    assert (mixed.source, mixed.type, mixed.storage) == ("recipe", "demo-wan2.2-t2v-a14b", "fp8_scaled")
    assert mixed.files["text_encoder"] == str((models / "demo" / "text_encoder").resolve())
    assert mixed.files["vae"] == str((models / "demo").resolve() / "vae")
    assert mixed.files["tokenizer"].endswith("tokenizer")
    assert not found["lone"].ok and "no low_noise partner" in found["lone"].reason
