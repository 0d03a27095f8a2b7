"""Bad requests get messages that name the field, the value and the fix."""
from __future__ import annotations

import pytest

from engine.models.catalog import get_spec, parse_lora_caps
from engine.run.request import resolve_request
from engine.types import GenerationRequest, LoraEntry, RequestError, Stack

T2V = get_spec("wan2.2-t2v-a14b")


def _req(**kw):
    return GenerationRequest(model="m", prompt=kw.pop("prompt", "a cat"), **kw)


@pytest.mark.parametrize("kw,message", [
    ({"height": 100}, "height 100 must be a multiple of 16"),
    ({"width": 65}, "width 65 must be a multiple of 16"),
    ({"frames": 80}, "frames 80 must be 4k+1"),
    ({"steps": 0}, "steps 0 must be between 1 and 200"),
    ({"guidance": float("nan")}, "guidance nan must be a number"),
    ({"prompt": "  "}, "prompt is empty"),
    ({"offload": "turbo"}, "offload 'turbo' must be one of"),
    ({"image": "x.png"}, "image is not used by Wan2.2 T2V A14B"),
    ({"seed": 2**40}, "seed 1099511627776 must be between 0 and"),
])
def test_bad_fields_are_named(kw, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace("+", r"\+")):
        resolve_request(_req(**kw), T2V)


def test_i2v_needs_an_image_and_5b_needs_multiples_of_32():
    with pytest.raises(RequestError, match="image is required"):
        resolve_request(_req(), get_spec("wan2.2-i2v-a14b"))
    with pytest.raises(RequestError, match="height 720 must be a multiple of 32"):
        resolve_request(_req(height=720), get_spec("wan2.2-ti2v-5b"))


def test_defaults_come_from_the_catalog():
    r = resolve_request(_req(seed=5), T2V)
    assert (r.width, r.height, r.frames, r.steps, r.guidance, r.guidance_2, r.seed) == (1280, 720, 81, 40, 4.0, 3.0, 5)
    assert resolve_request(_req(), get_spec("wan2.1-t2v-1.3b")).guidance_2 is None


def test_lora_entries_and_caps_are_checked():
    with pytest.raises(RequestError, match="applies_to 'middle'"):
        LoraEntry(file="a.safetensors", applies_to="middle")
    with pytest.raises(RequestError, match="weight 11 for a.safetensors must be a number between -10 and 10"):
        LoraEntry(file="a.safetensors", weight=11)
    with pytest.raises(RequestError, match="unknown stack entry field"):
        Stack.from_list([{"file": "a.safetensors", "strength": 1}])
    with pytest.raises(RequestError, match="TYPE=N"):
        parse_lora_caps(["wan2.2-t2v-a14b=zero"])
    assert parse_lora_caps(["wan2.2-t2v-a14b=4"]) == {"wan2.2-t2v-a14b": 4}


def test_entry_weights_per_expert_and_fingerprint():
    e = LoraEntry(file="a.safetensors", weight=0.8, applies_to="both", low_noise_weight=0.3)
    assert (e.weight_for("high_noise"), e.weight_for("low_noise"), e.weight_for("single")) == (0.8, 0.3, 0.8)
    hi = LoraEntry(file="h.safetensors", applies_to="high_noise")
    assert hi.weight_for("low_noise") == 0.0
    s1, s2 = Stack((e, hi)), Stack((e, LoraEntry(file="h.safetensors", applies_to="high_noise", weight=0.9)))
    assert s1.fingerprint() == Stack((e, hi)).fingerprint() != s2.fingerprint()
    assert [x.file for x in s1.enabled_for("low_noise")] == ["a.safetensors"]
