"""The catalog's defaults agree with the Wan examples shipped in the installed diffusers package."""
from __future__ import annotations

import re

import pytest

from engine.models.catalog import CATALOG, get_spec


def _example(module) -> str:
    return module.EXAMPLE_DOC_STRING


def _num(text: str, name: str) -> float:
    m = re.search(rf"{name}\s*=\s*([0-9.]+)", text)
    assert m, f"{name} not found in the diffusers example"
    return float(m.group(1))


def test_wan21_t2v_defaults_match_the_diffusers_example():
    from diffusers.pipelines.wan import pipeline_wan

    doc = _example(pipeline_wan)
    spec = get_spec("wan2.1-t2v-14b")
    assert "Wan-AI/Wan2.1-T2V-14B-Diffusers" in doc
    assert (spec.height, spec.width) == (_num(doc, "height"), _num(doc, "width"))
    assert spec.frames == _num(doc, "num_frames")
    assert spec.guidance == _num(doc, "guidance_scale")
    assert spec.fps == _num(doc, "fps")
    assert "5.0 for 720P, 3.0 for 480P" in doc
    assert spec.shift == 5.0 and get_spec("wan2.1-t2v-1.3b").shift == 3.0  # 1.3B is a 480P model


def test_wan21_i2v_defaults_match_the_diffusers_example():
    from diffusers.pipelines.wan import pipeline_wan_i2v

    doc = _example(pipeline_wan_i2v)
    spec = get_spec("wan2.1-i2v-14b")
    assert "max_area = 480 * 832" in doc
    assert spec.width * spec.height == 480 * 832
    assert spec.frames == _num(doc, "num_frames") and spec.guidance == _num(doc, "guidance_scale")
    assert spec.fps == _num(doc, "fps")


@pytest.mark.parametrize("model_type", [t for t in CATALOG if not t.startswith("demo-")])
def test_every_real_type_is_consistent(model_type):
    spec = get_spec(model_type)
    assert spec.width % spec.size_multiple == 0 and spec.height % spec.size_multiple == 0
    assert (spec.frames - 1) % 4 == 0
    assert (spec.boundary_ratio is not None) == spec.dual_expert == (spec.guidance_2 is not None)
    demo = get_spec("demo-" + model_type)
    assert demo.experts == spec.experts and demo.task == spec.task and demo.demo
    assert demo.family.startswith("demo ") and demo.family.endswith(spec.family)


def test_caps_follow_the_design_defaults():
    caps = {t: s.lora_cap for t, s in CATALOG.items()}
    assert caps["wan2.2-t2v-a14b"] == caps["wan2.2-i2v-a14b"] == 2
    assert caps["wan2.2-ti2v-5b"] == 3 and caps["wan2.1-t2v-1.3b"] == 3
    assert caps["wan2.1-t2v-14b"] == caps["wan2.1-i2v-14b"] == 2
    assert all(caps[t] == 3 for t in caps if t.startswith("demo-"))
