"""A speed preset (one with steps / guidance / shift) loaded in the page and saved again keeps its settings;
a setting changed on the page is saved; a stack saved over it from a fresh page keeps them too."""
from __future__ import annotations

import json

import pytest

from test_browser import pick, shot, wait_text, wait_value

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
SMALL = "demo-wan2.1-t2v-1.3b"


def _settings(path):
    data = json.loads(path.read_text())
    return {k: data.get(k) for k in ("steps", "guidance", "guidance_2", "shift")}, data["entries"]


def test_saving_a_loaded_speed_preset_keeps_or_updates_its_settings(page, app_server):
    path = app_server["root"] / "presets" / "speed-demo.json"
    path.write_text(json.dumps({
        "schema": 1, "name": "Speed demo", "model_type": SMALL, "notes": "", "created": "", "updated": "",
        "entries": [{"file": "demo/style-peft.safetensors", "weight": 0.8}],
        "steps": 4, "guidance": 1.0, "shift": 5.0}))
    page.reload()
    page.wait_for_selector("#generate")
    pick(page, "model-picker", SMALL)
    wait_text(page, "#model-note", "1 expert")
    pick(page, "preset-picker", "Speed demo")
    page.click("#preset-load")
    wait_text(page, "#preset-status", "it sets steps 4, guidance 1, shift 5")
    wait_value(page, "#steps input", "4")

    # saved again as it is (the name box holds the loaded name): the settings stay
    page.click("#preset-save")
    wait_text(page, "#preset-status", "saved")
    settings, entries = _settings(path)
    assert settings == {"steps": 4, "guidance": 1.0, "guidance_2": None, "shift": 5.0}
    assert entries[0]["weight"] == 0.8

    # steps changed on the page: saved; guidance and shift kept
    page.fill("#steps input", "6")
    page.press("#steps input", "Tab")
    page.fill("#preset-name :is(input, textarea)", "Speed demo")
    page.click("#preset-save")
    status = wait_text(page, "#preset-status", "steps 6")
    assert "guidance 1, shift 5" in status
    assert _settings(path)[0] == {"steps": 6, "guidance": 1.0, "guidance_2": None, "shift": 5.0}
    shot(page, "speed-preset-saved")

    # a fresh page (model defaults in the fields) saves another stack over it without loading it first
    page.reload()
    page.wait_for_selector("#generate")
    pick(page, "model-picker", SMALL)
    wait_text(page, "#model-note", "1 expert")
    assert page.input_value("#steps input") != "6"
    page.click("#add-lora")
    page.locator("#lora-row-0").wait_for(state="visible")
    pick(page, "lora-file-0", "detail-kohya")
    page.fill("#preset-name :is(input, textarea)", "Speed demo")
    page.click("#preset-save")
    wait_text(page, "#preset-status", "saved")
    settings, entries = _settings(path)
    assert settings == {"steps": 6, "guidance": 1.0, "guidance_2": None, "shift": 5.0}
    assert [e["file"] for e in entries] == ["demo/detail-kohya.safetensors"]
