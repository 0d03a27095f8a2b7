"""Saving over a speed preset keeps its run settings (steps, guidance, guidance_2, shift) unless the user
changed them on the page: through the facade, the fake, and the page's own rule (ui/presets_panel.py)."""
from __future__ import annotations

import json

import pytest

from engine.facade import Engine, Settings
from engine.presets import Preset, PresetError
from engine.types import LoraEntry, Stack
from fake_engine import A14B, T2V, FakeEngine
from ui.presets_panel import settings_to_save

SPEED = {"steps": 4, "guidance": 1.0, "guidance_2": 1.0, "shift": 5.0}


def _facade(tmp_path) -> Engine:
    (tmp_path / "loras").mkdir()
    return Engine(Settings(models_dir=tmp_path / "models", loras_dir=tmp_path / "loras",
                           presets_dir=tmp_path / "presets", outputs_dir=tmp_path / "out", data_dir=tmp_path / "data"))


@pytest.mark.parametrize("make", [_facade, FakeEngine], ids=["facade", "fake"])
def test_saving_over_a_speed_preset_keeps_its_settings_unless_given(tmp_path, make):
    engine = make(tmp_path)
    store = engine.preset_store if isinstance(engine, Engine) else engine.store
    store.save(Preset("Fast", A14B, [], "four steps", settings=dict(SPEED)))
    stack = Stack((LoraEntry("a.safetensors", 0.7),))

    saved = engine.save_preset("Fast", A14B, stack)  # the stack changed, the settings were not given
    assert saved.settings == SPEED and saved.notes == "four steps"
    assert [e["weight"] for e in saved.entries] == [0.7]
    on_disk = json.loads((tmp_path / "presets" / "fast.json").read_text())
    assert {k: on_disk[k] for k in SPEED} == SPEED

    changed = engine.save_preset("Fast", A14B, stack, settings={**SPEED, "steps": 6})
    assert changed.settings == {**SPEED, "steps": 6}
    cleared = engine.save_preset("Fast", A14B, stack, settings={})  # an explicit empty dict clears them
    assert cleared.settings == {}
    plain = engine.save_preset("Plain", T2V, Stack(()))  # a new preset gets no settings of its own accord
    assert plain.settings == {}


def test_settings_out_of_range_refuse_the_save_and_leave_the_file_as_it_was(tmp_path):
    engine = _facade(tmp_path)
    engine.preset_store.save(Preset("Fast", A14B, [], settings=dict(SPEED)))
    path = tmp_path / "presets" / "fast.json"
    before = path.read_bytes()
    with pytest.raises(PresetError, match="'steps' is 0"):
        engine.save_preset("Fast", A14B, Stack(()), settings={**SPEED, "steps": 0})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["fast.json"]  # no temp file left behind


PAGE = {"steps": 4, "guidance": 1.0, "guidance_2": 1.0, "shift": 5.0}  # what loading "Fast" put on the page


def _loaded(name="Fast", model=A14B, applied=None):
    return {"name": name, "model": model, "applied": dict(SPEED if applied is None else applied)}


def test_page_rule_unchanged_page_keeps_the_preset_settings():
    # loaded and saved again as it is: the preset's own settings (even if its file changed meanwhile)
    assert settings_to_save(_loaded(), A14B, "Fast", PAGE, {**SPEED, "shift": 8.0}) is None
    assert settings_to_save(_loaded(), A14B, "Fast", PAGE, SPEED) is None


def test_page_rule_a_changed_field_is_saved_the_rest_kept():
    page = {**PAGE, "steps": 6}
    assert settings_to_save(_loaded(), A14B, "Fast", page, SPEED) == {**SPEED, "steps": 6}
    assert settings_to_save(_loaded(), A14B, "Fast", page, {**SPEED, "shift": 8.0}) == {**SPEED, "steps": 6,
                                                                                        "shift": 8.0}
    # a field emptied on the page is not a change
    assert settings_to_save(_loaded(), A14B, "Fast", {**PAGE, "guidance": None}, SPEED) is None


def test_page_rule_settings_follow_the_loaded_preset_into_another_name():
    assert settings_to_save(_loaded(), A14B, "Mine", PAGE, None) == SPEED
    assert settings_to_save(_loaded(), A14B, "Mine", {**PAGE, "shift": 3.0}, None) == {**SPEED, "shift": 3.0}
    # over another speed preset: the page's values replace the ones the loaded preset set, the rest stay
    other = {"steps": 8, "shift": 7.0}
    assert settings_to_save(_loaded(applied={"steps": 4}), A14B, "Eight", PAGE, other) == {"steps": 4, "shift": 7.0}
    # the loaded preset was deleted meanwhile: saving under its name writes the page's values
    assert settings_to_save(_loaded(), A14B, "Fast", PAGE, None) == SPEED


def test_page_rule_nothing_loaded_or_another_model_keeps_the_target():
    page = {"steps": 40, "guidance": 4.0, "guidance_2": 3.0, "shift": 12.0}  # a model's defaults
    assert settings_to_save(None, A14B, "Fast", page, SPEED) is None
    assert settings_to_save(_loaded(model=A14B), "other-model", "Fast", page, SPEED) is None
    # a preset without settings was loaded: nothing of the page becomes a setting
    assert settings_to_save(_loaded(applied={}), A14B, "Fast", page, SPEED) is None
    assert settings_to_save(_loaded(applied={}), A14B, "Mine", page, None) is None
    # only what loading applied counts (one-expert models get no low-noise guidance)
    one = _loaded(model=T2V, applied={"steps": 4, "guidance": 1.0, "shift": 5.0})
    assert settings_to_save(one, T2V, "Fast", {**PAGE, "guidance_2": 9.0}, SPEED) is None
