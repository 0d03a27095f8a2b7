"""A model switch releases the old model: its pipeline, its experts, their parameters and the LoRA merge
state that belonged to them are all collectable (checked with weak references), and merge state lives
in a session that the loaded pipeline owns."""
from __future__ import annotations

import gc
import weakref

import pytest

from engine.facade import Engine, Settings
from engine.types import GenerationRequest, LoraEntry, Stack

pytestmark = pytest.mark.slow


def _refs(pipe) -> dict[str, list[weakref.ref]]:
    experts = [pipe.transformer] + ([pipe.transformer_2] if getattr(pipe, "transformer_2", None) is not None else [])
    return {
        "pipeline": [weakref.ref(pipe)],
        "experts": [weakref.ref(m) for m in experts],
        "parameters": [weakref.ref(p) for m in experts for p in m.parameters()],
        "vae": [weakref.ref(pipe.vae)],
    }


def _alive(refs: dict[str, list[weakref.ref]]) -> dict[str, int]:
    gc.collect()
    return {k: sum(r() is not None for r in v) for k, v in refs.items() if any(r() is not None for r in v)}


def test_switching_models_releases_the_old_pipeline_and_its_merge_state(demo_model, demo_loras_dir, tmp_path):
    a14b, small = demo_model("wan2.2-t2v-a14b"), demo_model("wan2.1-t2v-1.3b")
    engine = Engine(Settings(models_dir=a14b.parent, loras_dir=demo_loras_dir, outputs_dir=tmp_path / "out",
                             data_dir=tmp_path / "data"))
    stack = Stack((LoraEntry("demo/speed_high_noise.safetensors", 1.0, "high_noise"),
                   LoraEntry("demo/speed_low_noise.safetensors", 1.0, "low_noise")))
    first = engine.generate(GenerationRequest(model=a14b.name, prompt="x", steps=1, seed=1, frames=5, stack=stack))
    assert [r["status"] for r in first.loras] == ["applied", "applied"]
    generator = engine._generator
    session = generator._session
    assert session is not None and session._mergers  # the stack's merge state, owned with the pipeline
    refs = _refs(generator._pipe)
    refs["merge session"] = [weakref.ref(session)]
    del session
    assert _alive(refs)["parameters"] > 0  # sanity: everything is alive while the model is loaded

    engine.generate(GenerationRequest(model=small.name, prompt="x", steps=1, seed=1, frames=5))
    assert _alive(refs) == {}  # nothing of the first model survives the switch

    refs = _refs(generator._pipe)
    engine.release()
    assert _alive(refs) == {}  # release() lets go of the current model too


def test_a_merge_session_keeps_no_module_alive_and_close_drops_its_state(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine" / "lora"))
    from lora_factory import random_lowrank, tiny_transformer, write_lora

    from engine.models.catalog import get_spec
    from engine.lora.library import LoraLibrary
    from engine.lora.session import MergeSession

    model = tiny_transformer()
    write_lora(tmp_path / "a.safetensors", "wan", random_lowrank(model, seed=3), alpha=2.0)
    library = LoraLibrary(tmp_path)
    session = MergeSession(library, {"single": model})
    session.apply(get_spec("demo-wan2.1-t2v-1.3b"), Stack((LoraEntry("a.safetensors", 1.0),)))
    module_ref = weakref.ref(model)
    param_refs = [weakref.ref(p) for p in model.parameters()]
    del model
    gc.collect()
    assert module_ref() is None  # the session holds its experts weakly
    session.close()
    gc.collect()
    assert all(r() is None for r in param_refs)  # and its merge state goes with close()
    with pytest.raises(Exception, match="closed with its pipeline"):
        session.apply(get_spec("demo-wan2.1-t2v-1.3b"), Stack())
