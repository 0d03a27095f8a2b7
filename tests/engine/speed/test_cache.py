"""Step cache: off by default, off with a note under 10 steps, counts computed vs skipped passes and steps,
and leaves nothing attached after the run (the next run without a cache equals a never-cached one)."""
from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from engine.facade import Engine, Settings
from engine.speed import MIN_CACHE_STEPS, SpeedOptions
from engine.speed.cache import StepCounter, choose_cache
from engine.types import GenerationRequest


def test_cache_plan():
    assert not choose_cache("off", None, 30).enabled
    short = choose_cache("first_block", 0.05, MIN_CACHE_STEPS - 1)
    assert not short.enabled and f"under {MIN_CACHE_STEPS}" in short.note
    on = choose_cache("first_block", 0.1, 30)
    assert on.enabled and on.threshold == 0.1
    assert SpeedOptions().cache == "off"
    assert SpeedOptions(cache="first_block").threshold == 0.05
    with pytest.raises(ValueError, match="cache_threshold 2"):
        SpeedOptions(cache="first_block", cache_threshold=2)


def test_step_counter_counts_a_step_as_computed_when_any_pass_ran_in_full():
    c = StepCounter()
    for passes in ([True, True], [False, False], [False, True], []):
        for computed in passes:
            c.record(computed)
        c.end_step()
    assert c.to_dict() == {"passes_computed": 3, "passes_skipped": 3, "steps_computed": 2, "steps_skipped": 1}


@pytest.mark.slow
def test_cached_run_reports_skips_and_leaves_the_model_clean(demo_model, demo_loras_dir, tmp_path):
    model = demo_model("wan2.1-t2v-1.3b")
    engine = Engine(Settings(models_dir=model.parent, outputs_dir=tmp_path / "out", loras_dir=demo_loras_dir,
                             data_dir=tmp_path / "data"))

    def run(steps, speed=None):
        req = GenerationRequest(model=model.name, prompt="fog", steps=steps, seed=3, frames=5, width=64, height=64,
                                speed=speed)
        return engine.generate(req, lambda event: None)

    plain = run(12)
    assert plain.speed["cache"]["kind"] == "off"
    cached = run(12, SpeedOptions(cache="first_block", cache_threshold=0.5))
    c = cached.speed["cache"]
    assert c["kind"] == "first_block" and c["threshold"] == 0.5
    assert c["steps_computed"] + c["steps_skipped"] == 12
    assert c["passes_computed"] + c["passes_skipped"] == 24  # cond + uncond per step (guidance 5)
    assert c["passes_skipped"] > 0 and c["passes_computed"] >= 2  # the first pass of each branch always runs
    assert not np.array_equal(iio.imread(cached.path), iio.imread(plain.path))
    transformer = engine._generator._pipe.transformer
    assert not transformer.is_cache_enabled
    assert np.array_equal(iio.imread(run(12).path), iio.imread(plain.path))

    short = run(4, SpeedOptions(cache="first_block"))
    assert short.speed["cache"]["kind"] == "off" and "under 10" in short.speed["cache"]["note"]


def test_the_run_plan_shows_the_speed_plan(demo_model, tmp_path):
    from engine.port import Plan

    model = demo_model("wan2.1-t2v-1.3b")
    engine = Engine(Settings(models_dir=model.parent, outputs_dir=tmp_path / "out", loras_dir=tmp_path,
                             data_dir=tmp_path / "data", attention="sage"))
    events = []
    result = engine.generate(GenerationRequest(model=model.name, prompt="x", steps=2, frames=5, width=64, height=64,
                                               speed=SpeedOptions(cache="first_block")), events.append)
    (plan,) = [e.plan for e in events if isinstance(e, Plan)]
    speed = plan.speed
    assert speed["attention"]["backend"] == "native" and speed["attention"]["requested"] == "sage"
    assert "sage needs a CUDA GPU" in speed["attention"]["reason"]
    assert not speed["compile"]["enabled"] and speed["cache"]["kind"] == "off"
    assert len(speed["reasons"]) == 3
    assert result.speed["attention"]["backend"] == "native" and result.speed["fp8_compute"]["enabled"] is False
