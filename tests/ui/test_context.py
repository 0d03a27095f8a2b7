"""Server-side checks the UI and API share, through the engine's door: client-named models and presets
are checked; presets with missing or changed files load with those rows marked."""
import json

import pytest

from engine.port import EnginePort, LoraView
from engine.presets import Preset
from engine.types import RequestError
from fake_engine import T2V, FakeEngine
from ui.context import UIContext

LORAS = [
    LoraView("demo/a.safetensors", sha256="aa"),
    LoraView("demo/b.safetensors", sha256="bb"),
    LoraView("demo/big.safetensors", sha256="cc", compatible=False, reason="made for Wan 14B"),
]


@pytest.fixture
def ctx(tmp_path):
    return UIContext(FakeEngine(tmp_path, loras=LORAS))


def test_the_fake_and_the_real_facade_implement_the_same_door(tmp_path):
    from engine.facade import Engine, Settings

    assert isinstance(FakeEngine(tmp_path), EnginePort)
    assert isinstance(Engine(Settings(presets_dir=tmp_path)), EnginePort)


def test_unknown_models_and_lora_listing(ctx):
    with pytest.raises(RequestError, match="not found"):
        ctx.spec_for("../../etc")
    assert ctx.compatible_files(T2V) == ["demo/a.safetensors", "demo/b.safetensors"]
    assert ctx.lora_info(T2V, "demo/big.safetensors").reason == "made for Wan 14B"


def test_stack_from_text_takes_json_or_a_known_preset_name(ctx, tmp_path):
    spec = ctx.spec_for(T2V)
    assert ctx.stack_from_text("", spec).entries == ()
    stack = ctx.stack_from_text(json.dumps([{"file": "demo/a.safetensors", "weight": 0.3}]), spec)
    assert stack.entries[0].weight == 0.3
    ctx.engine.store.save(Preset("Good", T2V, [{"file": "demo/b.safetensors", "weight": 2.0}]))
    assert ctx.stack_from_text("Good", spec).entries[0].file == "demo/b.safetensors"
    with pytest.raises(RequestError, match="neither JSON nor a saved preset"):
        ctx.stack_from_text("../../etc/passwd", spec)
    with pytest.raises(RequestError, match="not valid JSON"):
        ctx.stack_from_text("[{oops", spec)
    ctx.engine.store.save(Preset("Broken", T2V, [{"file": "demo/gone.safetensors", "weight": 1.0}]))
    with pytest.raises(RequestError, match="not in the folder"):
        ctx.stack_from_text("Broken", spec)


def test_door_methods_match_the_protocol_in_the_facade_and_the_fake():
    import inspect

    from engine.facade import Engine

    members = [n for n, v in vars(EnginePort).items() if callable(v) and not n.startswith("_")]
    assert {"validate", "generate", "models", "loras", "load_preset", "outputs", "cap_problem"} <= set(members)
    for name in members:
        want = list(inspect.signature(getattr(EnginePort, name)).parameters)
        for impl in (Engine, FakeEngine):
            got = list(inspect.signature(getattr(impl, name)).parameters)
            assert got == want, (impl.__name__, name, got, want)
