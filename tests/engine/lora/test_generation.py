"""Generation-level exactness: a stack at weight 0 gives the same video as none; a LoRA changes it; removal restores."""
from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from engine.facade import Engine, Settings
from engine.types import GenerationRequest, LoraEntry, Stack
from lora_factory import random_lowrank, tiny_transformer, write_lora


def _frames(result) -> np.ndarray:
    return iio.imread(result.path)


@pytest.mark.slow
def test_weight_zero_equals_no_stack_and_a_lora_changes_the_output(demo_model, tmp_path):
    model = demo_model("wan2.2-t2v-a14b")
    loras = tmp_path / "loras"
    loras.mkdir()
    lowrank = {k: (d, u * 20) for k, (d, u) in random_lowrank(tiny_transformer(width=32), rank=4).items()}
    write_lora(loras / "strong.safetensors", "wan", lowrank, alpha=4.0)
    engine = Engine(Settings(models_dir=model.parent, outputs_dir=tmp_path / "out", loras_dir=loras,
                             data_dir=tmp_path / "data"))

    def run(stack: Stack):
        req = GenerationRequest(model=model.name, prompt="a lighthouse", steps=2, seed=5, frames=5,
                                width=64, height=64, stack=stack)
        return engine.generate(req, lambda event: None)

    plain = _frames(run(Stack()))
    zero = run(Stack((LoraEntry("strong.safetensors", weight=0.0),)))
    assert zero.loras[0]["status"] == "skipped"
    assert np.array_equal(_frames(zero), plain)
    with_lora = run(Stack((LoraEntry("strong.safetensors", weight=1.0),)))
    assert with_lora.loras[0]["status"] == "applied"
    cov = with_lora.loras[0]["coverage"]
    assert cov["applied"] == cov["total"]
    assert not np.array_equal(_frames(with_lora), plain)
    low_only = run(Stack((LoraEntry("strong.safetensors", weight=1.0, applies_to="low_noise"),)))
    assert not np.array_equal(_frames(low_only), _frames(with_lora))
    again = run(Stack())  # removing the stack restores W0 exactly, so the output is the plain one again
    assert np.array_equal(_frames(again), plain)
