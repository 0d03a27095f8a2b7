"""Wan2GP `.lset` import keeps schedules and phases; export and import round-trip."""
from __future__ import annotations

import json

import pytest

from engine.presets import PresetError, parse_lset, to_lset, validate
from engine.types import Stack

A14B = "wan2.2-t2v-a14b"
T2V = "wan2.1-t2v-1.3b"


def _lset(mult, loras=None, **extra):
    loras = loras or [f"l{i}.safetensors" for i in range(len(mult.split()))]
    return json.dumps({"loras": loras, "loras_mult": mult, **extra})


def test_wan2gp_phases_and_time_lists_become_schedules_exactly():
    p = parse_lset(_lset("1.0,0.8;0.5 0.9,0.8,0.7 0;0.2,0.4 1,0.5;0 1;1 2"), A14B, "x")
    e = p.entries
    assert e[0] == {"file": "l0.safetensors", "weight": [1.0, 0.8], "applies_to": "both", "low_noise_weight": 0.5,
                    "enabled": True}
    assert e[1]["weight"] == [0.9, 0.8, 0.7] and e[1]["applies_to"] == "both" and "low_noise_weight" not in e[1]
    assert e[2]["weight"] == [0.2, 0.4] and e[2]["applies_to"] == "low_noise"
    assert e[3]["weight"] == [1.0, 0.5] and e[3]["applies_to"] == "high_noise"
    assert e[4]["weight"] == 1.0 and "low_noise_weight" not in e[4]
    assert e[5]["weight"] == 2.0
    assert p.notes == ""  # everything above is expressed exactly: no note
    validate(p.to_dict())  # a valid schema-1 preset with list weights
    stack = Stack.from_list([{k: v for k, v in r.items()} for r in e])
    assert stack.entries[0].scheduled and not stack.entries[4].scheduled


def test_what_a_preset_cannot_express_gets_a_note():
    three = parse_lset(_lset("1;0.8;0.5 1;1;0.5"), A14B, "x")
    assert three.entries[0]["weight"] == [1.0, 0.8] and three.entries[0]["low_noise_weight"] == 0.5
    assert "3 guidance phases" in three.notes and "l0.safetensors" in three.notes
    assert "l1.safetensors" not in three.notes  # equal phases join exactly
    assert three.entries[1]["weight"] == 1.0 and three.entries[1]["low_noise_weight"] == 0.5
    switch1 = parse_lset(_lset("1;0.8;0.5", model_switch_phase=1), A14B, "x")
    assert switch1.entries[0]["weight"] == 1.0 and switch1.entries[0]["low_noise_weight"] == [0.8, 0.5]
    one = parse_lset(_lset("1,0.5;0"), T2V, "x")
    assert one.entries[0]["weight"] == [1.0, 0.5, 0.0] and "one-expert model" in one.notes


def test_comments_bars_and_errors():
    p = parse_lset(_lset("# speed\n1;0\n0.5 | 0.7", loras=["a.safetensors", "b.safetensors", "c.safetensors"]), A14B, "x")
    assert [r["weight"] for r in p.entries] == [1.0, 0.5, 0.7]
    with pytest.raises(PresetError, match="empty value"):
        parse_lset(_lset("1,,2"), A14B, "x")
    with pytest.raises(PresetError, match="at most 3"):
        parse_lset(_lset("1;1;1;1"), A14B, "x")
    with pytest.raises(PresetError, match=r"between -10 and 10"):
        parse_lset(_lset("1,12"), A14B, "x")


@pytest.mark.parametrize("model_type,mult", [
    (A14B, "1,0.8;0.5 0.9,0.8,0.7 0;0.2,0.4 1,0.5;0 2 0;0"),
    (T2V, "0.7 1,0.5,0.25 0"),
])
def test_lset_round_trips(model_type, mult):
    first = parse_lset(_lset(mult), model_type, "x")
    text = to_lset(first)
    assert json.loads(text)["loras_mult"] == mult  # these tokens are already in canonical form
    again = parse_lset(text, model_type, "x")
    assert again.entries == first.entries
