"""Generation under the memory governor: the plan is reported before the first step, and an
out-of-memory during a run is recovered by the next heavier plan with the same video as a result."""
from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from engine.facade import Engine, Settings
from engine.memory import NotEnoughMemory
from engine.port import Memory, Plan, Retry, StackApplied, Step
from engine.types import GenerationRequest


def _engine(model, tmp_path) -> Engine:
    return Engine(Settings(models_dir=model.parent, outputs_dir=tmp_path / "out", loras_dir=tmp_path / "loras"))


def _oom_forward(module, failures: int):
    """Make `module.forward` raise torch.OutOfMemoryError on its first `failures` calls."""
    original = module.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return original(*args, **kwargs)

    module.forward = forward
    return calls


def test_plan_comes_before_the_first_step_and_is_in_the_result(demo_model, tmp_path):
    model = demo_model("wan2.1-t2v-1.3b")
    kinds = []
    result = _engine(model, tmp_path).generate(GenerationRequest(model=model.name, prompt="x", steps=2, seed=1),
                                               lambda event: kinds.append(type(event)))
    assert kinds.index(Plan) < kinds.index(StackApplied) < kinds.index(Step)
    assert Memory in kinds
    assert result.plan["mode"] == result.offload and result.plan["reasons"]
    assert result.peak_ram_bytes and result.peak_ram_bytes > 0


def test_an_out_of_memory_is_retried_with_the_next_plan_and_finishes(demo_model, tmp_path):
    model = demo_model("wan2.2-t2v-a14b")
    engine = _engine(model, tmp_path)
    req = GenerationRequest(model=model.name, prompt="a cat", steps=2, seed=5)
    reference = iio.imread(engine.generate(req).path)
    calls = _oom_forward(engine._generator._pipe.transformer, failures=1)
    retries = []
    result = engine.generate(req, lambda event: retries.append(event.message) if isinstance(event, Retry) else None)
    assert calls["n"] > 1
    assert retries == ["retried with model offload after out-of-memory"]
    assert result.notes == retries and result.offload == "model" and result.plan["vae_tiling"]
    assert np.array_equal(iio.imread(result.path), reference)


def test_always_out_of_memory_ends_in_the_clear_message(demo_model, tmp_path):
    model = demo_model("wan2.1-t2v-1.3b")
    engine = _engine(model, tmp_path)
    req = GenerationRequest(model=model.name, prompt="a cat", steps=1, seed=5)
    engine.generate(req)
    _oom_forward(engine._generator._pipe.transformer, failures=10**6)
    with pytest.raises(NotEnoughMemory, match="tried: .*sequential.*lower the frames or the resolution"):
        engine.generate(req)
    assert not list((tmp_path / "out").glob("*.mp4"))[1:]  # only the first, successful run wrote a video
