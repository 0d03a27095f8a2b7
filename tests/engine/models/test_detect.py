"""Model detection names each architecture and gives reasons, never exceptions, for broken folders."""
from __future__ import annotations

import json

import pytest

from engine.models.detect import classify, detect, scan

ARCHS = ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"]


@pytest.mark.parametrize("arch", ARCHS)
def test_demo_models_are_detected_as_their_architecture(arch, demo_model):
    info = detect(demo_model(arch))
    assert info.ok, info.reason
    assert info.type == f"demo-{arch}" and info.demo
    assert "random weights" in info.label


def _t(heads, in_ch, head_dim=128):
    return {"num_attention_heads": heads, "attention_head_dim": head_dim, "in_channels": in_ch}


@pytest.mark.parametrize("index,tconfig,has2,expected", [
    ({"expand_timesteps": False}, _t(40, 16), True, "wan2.2-t2v-a14b"),
    ({}, _t(40, 36), True, "wan2.2-i2v-a14b"),
    ({"expand_timesteps": True}, _t(24, 48), False, "wan2.2-ti2v-5b"),
    ({}, _t(40, 16), False, "wan2.1-t2v-14b"),
    ({}, _t(12, 16), False, "wan2.1-t2v-1.3b"),
    ({}, _t(40, 36), False, "wan2.1-i2v-14b"),
])
def test_real_configs_are_classified(index, tconfig, has2, expected):
    """The published Wan-AI *-Diffusers configs: heads x 128 = width 1536 / 3072 / 5120."""
    assert classify(index, tconfig, has2) == expected


def test_a_width_that_does_not_fit_the_layout_is_refused():
    with pytest.raises(ValueError, match="width 1536 does not fit wan2.1-i2v-14b"):
        classify({}, _t(12, 36), False)


def test_broken_folders_get_reasons(tmp_path):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "model_index.json").write_text("{not json")
    sd = tmp_path / "sdxl"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    found = {m.id: m for m in scan(tmp_path)}
    assert not any(m.ok for m in found.values())
    assert "no model_index.json" in found["empty"].reason
    assert "unreadable" in found["badjson"].reason
    assert "not a Wan" in found["sdxl"].reason


def test_missing_component_and_missing_weights(demo_model, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(demo_model("wan2.1-t2v-1.3b"), copy)
    for f in (copy / "transformer").glob("*.safetensors"):
        f.unlink()
    assert "no .safetensors" in detect(copy).reason
    shutil.rmtree(copy / "vae")
    assert "vae/ is missing" in detect(copy).reason
