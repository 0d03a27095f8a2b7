"""The Speed switches: on the page with honest labels, carried into the request at the door, and the run's
speed plan shown next to the memory plan."""
from __future__ import annotations

import pytest

from engine.port import PlanView, SpeedOptions
from engine.types import RequestError
from fake_engine import T2V, FakeEngine
from ui import run_view as rv
from ui.context import UIContext
from ui.generate import build_request
from ui.speed_panel import options
from ui.stack_logic import to_stack


def test_page_has_the_speed_switches_with_their_limits_said(tmp_path):
    from ui import build_ui

    demo = build_ui(FakeEngine(tmp_path))
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    attention, compile_, cache = by_id["speed-attention"], by_id["speed-compile"], by_id["speed-cache"]
    assert attention.value == "auto" and "falls back" in attention.info
    assert compile_.value == "auto" and "first run takes minutes" in compile_.info
    assert cache.value == "off" and "10+ steps" in cache.info
    assert by_id["speed-cache-threshold"].value == 0.05


def test_switches_become_the_requests_speed_options(tmp_path):
    engine = FakeEngine(tmp_path)
    ctx = UIContext(engine)
    speed = options("native", "on", "first_block", 0.2)
    checked = build_request(ctx, T2V, "a fox", "", None, 64, 64, 9, 12, 1, to_stack([]), speed=speed)
    assert checked.request.speed == SpeedOptions(attention="native", compile="on", cache="first_block",
                                                 cache_threshold=0.2)
    assert options("auto", "auto", "off", 0.3).cache_threshold is None  # no cache: no threshold
    with pytest.raises(RequestError, match="attention 'warp'"):
        options("warp", "auto", "off", 0.05)


def test_plan_panel_shows_the_speed_reasons():
    plan = PlanView("none", reasons=("fits",), speed={"reasons": ["attention: native SDPA", "compile: off (asked for)",
                                                                  "step cache: off"]})
    text = rv.plan_markdown(plan)
    assert "**Speed:** Attention: native SDPA. Compile: off (asked for). Step cache: off." in text


def test_loading_a_speed_preset_fills_the_settings_and_says_so(tmp_path):
    import json

    from engine.models.catalog import get_spec
    from ui.presets_panel import _with_preset_settings

    engine = FakeEngine(tmp_path)
    preset = {"schema": 1, "name": "Fast", "model_type": T2V, "entries": [], "steps": 4, "guidance": 1.0,
              "guidance_2": 1.0, "shift": 5.0}
    engine.import_preset(json.dumps(preset).encode(), "fast.json", T2V)
    loaded = engine.load_preset("Fast", T2V)
    assert loaded.preset.settings == {"steps": 4, "guidance": 1.0, "guidance_2": 1.0, "shift": 5.0}
    switch, said = _with_preset_settings([None] * 12, loaded.preset.settings, get_spec(T2V))
    assert said == "steps 4, guidance 1, shift 5"  # one expert: no low-noise guidance
    assert switch[6]["value"] == 4 and switch[9]["value"] == 5.0 and switch[8] is None
    _, said = _with_preset_settings([None] * 12, loaded.preset.settings, get_spec("wan2.2-t2v-a14b"))
    assert "low-noise guidance 1" in said
