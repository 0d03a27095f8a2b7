"""The facade's typed door without a run: presets load for (and switch to) their own model, validate()
checks a request once and hands back everything the generator needs."""
from __future__ import annotations

import pytest

from engine.facade import Engine, Settings
from engine.port import ModelView, ValidatedRequest
from engine.presets import Preset
from engine.types import GenerationRequest, LoraEntry, RequestError, Stack, WanStackError

SMALL, BIG = "demo-wan2.1-t2v-1.3b", "demo-wan2.2-t2v-a14b"


@pytest.fixture
def engine(demo_model, demo_loras_dir, tmp_path):
    # Only these two: the session's demo folder also holds whatever other tests built (a 5B among them).
    root = tmp_path / "models"
    root.mkdir()
    for arch in ("wan2.1-t2v-1.3b", "wan2.2-t2v-a14b"):
        folder = demo_model(arch)
        (root / folder.name).symlink_to(folder, target_is_directory=True)
    return Engine(Settings(models_dir=root, loras_dir=demo_loras_dir, presets_dir=tmp_path / "presets",
                           outputs_dir=tmp_path / "out", data_dir=tmp_path / "data", lora_caps={SMALL: 2}))


def test_models_are_views_with_their_spec_and_the_list_is_cached_until_a_rescan(engine, tmp_path):
    views = {m.id: m for m in engine.models()}
    assert isinstance(views[SMALL], ModelView) and views[SMALL].spec.lora_cap == 2  # the server's caps
    assert views[BIG].spec.dual_expert
    extra = engine.settings.models_dir / "not-a-model"
    extra.mkdir()
    try:
        assert "not-a-model" not in {m.id for m in engine.models()}  # cached: no rescan per call
        assert "not-a-model" in {m.id for m in engine.models(refresh=True)}
    finally:
        extra.rmdir()
        engine.models(refresh=True)


def test_a_preset_loads_for_its_own_model_and_says_which_it_needs(engine):
    engine.preset_store.save(Preset("Pair", BIG, [{"file": "demo/speed_high_noise.safetensors", "weight": 1.0,
                                                   "applies_to": "high_noise"}]))
    loaded = engine.load_preset("Pair", SMALL)  # picked while the 1.3B model is current
    assert loaded.model.id == BIG and loaded.rows[0]["status"] == "ok"
    engine.preset_store.save(Preset("Five B", "demo-wan2.2-ti2v-5b", []))
    missing = engine.load_preset("Five B", SMALL)
    assert missing.model is None and "needs a demo-wan2.2-ti2v-5b model" in missing.notes[0]
    with pytest.raises(RequestError, match="not found"):
        engine.load_preset("../etc", SMALL)


def test_validate_checks_once_and_resolves_everything(engine):
    ok = engine.validate(GenerationRequest(model=SMALL, prompt="a fox", stack=Stack((
        LoraEntry("demo/style-peft.safetensors", 0.5),))))
    assert isinstance(ok, ValidatedRequest) and ok.model.id == SMALL and ok.spec.type == SMALL
    assert ok.resolved.frames == ok.spec.frames and 0 <= ok.resolved.seed < 2**32
    for stack, message in [
        ((LoraEntry("../../etc/passwd"),), "unknown LoRA '../../etc/passwd' \\(row 1\\)"),
        ((LoraEntry("demo/speed_high_noise.safetensors"),), "does not fit"),
        (tuple(LoraEntry(f) for f in ("demo/style-peft.safetensors", "demo/motion-comfy.safetensors",
                                      "demo/detail-kohya.safetensors")), "LoRA cap reached.*--lora-cap"),
    ]:
        with pytest.raises(WanStackError, match=message):
            engine.validate(GenerationRequest(model=SMALL, prompt="a fox", stack=Stack(stack)))
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.validate(GenerationRequest(model=SMALL, prompt=" "))
    assert engine.cap_problem(SMALL, Stack((LoraEntry("a"), LoraEntry("b"), LoraEntry("c")))).startswith(
        "LoRA cap reached")
