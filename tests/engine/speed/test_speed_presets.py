"""Speed presets: shipped Lightning / LightX2V recipes, optional steps/guidance/shift in the preset schema,
what a preset changed, and rows marked missing until the user's files are there."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.models.catalog import get_spec
from engine.presets import PresetError, PresetStore, mark_entries, parse_json
from engine.speed.presets import apply_settings, locate_files
from engine.types import GenerationRequest

ROOT = Path(__file__).resolve().parents[3]
LIGHTNING_T2V = ("Wan2.2-Lightning_T2V-A14B-4steps-lora_HIGH_fp16.safetensors",
                 "Wan2.2-Lightning_T2V-A14B-4steps-lora_LOW_fp16.safetensors")


def _shipped() -> dict:
    store = PresetStore(ROOT / "presets")
    return {p.name: store.load(p.name) for p in store.list() if not get_spec(p.model_type).demo}


def test_shipped_speed_presets_carry_the_published_recipes():
    presets = _shipped()
    for steps in (4, 6, 8):
        p = presets[f"Lightning {steps}-step T2V A14B"]
        assert p.model_type == "wan2.2-t2v-a14b"
        assert p.settings == {"steps": steps, "guidance": 1.0, "guidance_2": 1.0, "shift": 5.0}
        assert [(e["file"], e["applies_to"], e["weight"]) for e in p.entries] == [
            (LIGHTNING_T2V[0], "high_noise", 1.0), (LIGHTNING_T2V[1], "low_noise", 1.0)]
    i2v = presets["Lightning 4-step I2V A14B"]
    assert i2v.model_type == "wan2.2-i2v-a14b" and "I2V-A14B-4steps-lora_HIGH" in i2v.entries[0]["file"]
    x = presets["LightX2V Wan2.1 LoRA on Wan2.2 T2V"]
    (entry,) = x.entries
    assert entry["file"] == "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"
    assert (entry["applies_to"], entry["weight"], entry["low_noise_weight"]) == ("both", 3.0, 1.5)
    assert x.settings["guidance"] == 1.0
    for p in presets.values():
        assert "Kijai/WanVideo_comfy" in p.notes  # where the user gets the files


def test_rows_are_missing_until_the_files_are_there_in_any_sub_folder():
    p = _shipped()["Lightning 4-step T2V A14B"]
    assert [r["status"] for r in mark_entries(p.entries, {})] == ["missing", "missing"]
    available = [f"lightning/{LIGHTNING_T2V[0]}", f"lightning/{LIGHTNING_T2V[1]}", "other.safetensors"]
    located = locate_files(p.entries, available)
    assert [r["file"] for r in located] == available[:2]
    assert [r["status"] for r in mark_entries(located, {f: None for f in available})] == ["ok", "ok"]
    # Two copies of the same name: ambiguous, left for the user to pick.
    assert locate_files(p.entries, ["a/" + LIGHTNING_T2V[0], "b/" + LIGHTNING_T2V[0]])[0]["file"] == LIGHTNING_T2V[0]


def test_preset_settings_apply_unless_set_by_the_user_and_the_changes_are_reported():
    spec = get_spec("wan2.2-t2v-a14b")
    settings = {"steps": 4, "guidance": 1.0, "guidance_2": 1.0, "shift": 5.0}
    req, changes = apply_settings(GenerationRequest(model="m", prompt="p"), settings, spec, preset_name="L4")
    assert (req.steps, req.guidance, req.guidance_2, req.shift) == (4, 1.0, 1.0, 5.0)
    assert f"steps {spec.steps} -> 4 (preset L4)" in changes and len(changes) == 4
    req, changes = apply_settings(GenerationRequest(model="m", prompt="p", steps=6), settings, spec, {"steps"})
    assert req.steps == 6 and not any(c.startswith("steps") for c in changes)
    single = get_spec("wan2.1-t2v-1.3b")
    req, changes = apply_settings(GenerationRequest(model="m", prompt="p"), settings, single)
    assert req.guidance_2 is None and not any("guidance_2" in c for c in changes)


def test_schema_stays_compatible_and_checks_the_new_fields(tmp_path):
    old = {"schema": 1, "name": "Old", "model_type": "wan2.1-t2v-1.3b", "entries": []}
    assert parse_json(json.dumps(old)).settings == {}
    new = parse_json(json.dumps({**old, "steps": 8, "shift": 3}))
    assert new.settings == {"steps": 8, "shift": 3.0}
    assert parse_json(json.dumps(new.to_dict())).settings == new.settings
    assert "guidance" not in new.to_dict()
    with pytest.raises(PresetError, match="'steps' must be a whole number"):
        parse_json(json.dumps({**old, "steps": 4.5}))
    with pytest.raises(PresetError, match="'shift' is 0"):
        parse_json(json.dumps({**old, "shift": 0}))
    store = PresetStore(tmp_path)
    store.save(new)
    assert store.load("Old").settings == {"steps": 8, "shift": 3.0}


def test_cli_names_the_missing_files_of_a_speed_preset(tmp_path, demo_model):
    model = demo_model("wan2.2-t2v-a14b")
    out = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--model", str(model), "--prompt", "x",
         "--preset", "Lightning 4-step T2V A14B", "--presets-dir", str(ROOT / "presets"),
         "--loras-dir", str(tmp_path), "--out", str(tmp_path / "x.mp4")],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: preset 'Lightning 4-step T2V A14B' needs " + LIGHTNING_T2V[0])
    assert "Kijai/WanVideo_comfy" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_cli_preset_sets_steps_and_shift_and_says_so(tmp_path, demo_model, demo_loras_dir):
    model = demo_model("wan2.2-t2v-a14b")
    presets = tmp_path / "presets"
    PresetStore(presets).save(parse_json(json.dumps({
        "schema": 1, "name": "Demo fast", "model_type": "demo-wan2.2-t2v-a14b",
        "entries": [{"file": "speed_high_noise.safetensors", "weight": 1.0, "applies_to": "high_noise"}],
        "steps": 2, "guidance": 1.0, "guidance_2": 1.0, "shift": 5.0})))
    out = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--model", str(model), "--prompt", "x", "--preset", "Demo fast",
         "--presets-dir", str(presets), "--loras-dir", str(demo_loras_dir), "--frames", "5", "--seed", "1",
         "--out", str(tmp_path / "x.mp4"), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["steps"] == 2
    assert "steps 4 -> 2 (preset Demo fast)" in summary["preset_changes"]
    assert any(c.startswith("shift") for c in summary["preset_changes"])
    assert summary["loras"][0]["status"] == "applied"  # found in demo/ by its file name
    assert summary["speed"]["attention"]["backend"] == "native"
