"""Regional compile: compiled once per model, never recompiled by stack changes or weight moves, and the
compiled blocks see every merged stack (same frames as the uncompiled model), under offload too.

torch.compile runs with the `eager` backend here: recompiles are decided by dynamo's guards, the same for
every backend, and eager skips the minutes inductor needs on this CPU (benchmarks/step_cost.py runs inductor).
"""
from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from engine.facade import Engine, Settings
from engine.speed import SpeedOptions
from engine.speed.compile import choose_compile, dynamo_counts, is_compiled
from engine.types import GenerationRequest, LoraEntry, Stack

STACKS = [
    Stack((LoraEntry("demo/style-peft.safetensors", 1.0), LoraEntry("demo/motion-comfy.safetensors", 0.7))),
    Stack((LoraEntry("demo/style-peft.safetensors", 0.4), LoraEntry("demo/motion-comfy.safetensors", 0.7))),  # slider
    Stack((LoraEntry("demo/detail-kohya.safetensors", 1.0), LoraEntry("demo/reward-diff.safetensors", 1.0),
           LoraEntry("demo/style-peft.safetensors", -0.5))),
]


def _engine(model, loras, tmp_path, compile_mode: str) -> Engine:
    return Engine(Settings(models_dir=model.parent, outputs_dir=tmp_path / f"out-{compile_mode}", loras_dir=loras,
                           data_dir=tmp_path / "data", compile=compile_mode, compile_backend="eager"))


def _run(engine, model, stack, offload="none"):
    req = GenerationRequest(model=model.name, prompt="a lighthouse", steps=2, seed=5, frames=5, width=64, height=64,
                            stack=stack, offload=offload)
    return engine.generate(req, lambda event: None)


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["none", "group"])
def test_three_stack_changes_after_compile_recompile_nothing(demo_model, demo_loras_dir, tmp_path, offload):
    import torch._dynamo

    model = demo_model("wan2.1-t2v-1.3b")
    compiled = _engine(model, demo_loras_dir, tmp_path, "on")
    torch._dynamo.reset()  # graphs from an earlier test would serve this model's blocks without compiling
    before_first = dynamo_counts()
    first = _run(compiled, model, Stack(), offload)
    assert first.speed["compile"]["enabled"] and first.speed["compile"]["changes"]
    assert is_compiled(compiled._generator._pipe.transformer)
    after_first = dynamo_counts()
    assert after_first["frames"] > before_first["frames"], "the compiled blocks never ran"

    results = [_run(compiled, model, stack, offload) for stack in STACKS]
    assert dynamo_counts() == after_first, "a stack change recompiled"
    assert all(not r.speed["compile"]["changes"] for r in results)
    assert all(row["status"] == "applied" for r in results for row in r.loras)

    # The compiled blocks read the merged weights: same frames as the same stack without compile.
    plain = _run(_engine(model, demo_loras_dir, tmp_path, "off"), model, STACKS[-1], offload)
    assert not plain.speed["compile"]["enabled"]
    assert np.array_equal(iio.imread(results[-1].path), iio.imread(plain.path))
    assert not np.array_equal(iio.imread(results[0].path), iio.imread(results[-1].path))


def test_compile_policy_says_why_it_is_off():
    assert choose_compile("auto", "cuda", "none").enabled
    assert choose_compile("auto", "cuda", "group").enabled
    cpu = choose_compile("auto", "cpu", "none")
    assert not cpu.enabled and "--compile" in cpu.reason
    assert choose_compile("on", "cpu", "none").enabled
    seq = choose_compile("on", "cuda", "sequential")
    assert not seq.enabled and "sequential" in seq.reason
    rt = choose_compile("on", "cuda", "none", runtime_loras=True)
    assert not rt.enabled and "runtime" in rt.reason
    tool = choose_compile("on", "cpu", "none", toolchain="no C++ compiler found")
    assert not tool.enabled and "C++" in tool.reason
    assert not choose_compile("off", "cuda", "none").enabled


def test_compile_option_is_validated():
    with pytest.raises(ValueError, match="compile 'fast'"):
        SpeedOptions(compile="fast")


@pytest.mark.slow
def test_runtime_loras_run_eager_on_a_compiled_model_and_compile_comes_back_without_recompiling(
        demo_model, demo_loras_dir, tmp_path):
    """torch.compile does not guard on forward hooks added inside a compiled block (measured: a scheduled
    LoRA attached after compiling was silently ignored). So a run with runtime LoRAs sets the compiled
    blocks aside, and the next merged-only run takes them back."""
    import torch._dynamo

    model = demo_model("wan2.1-t2v-1.3b")
    scheduled = Stack((LoraEntry("demo/style-peft.safetensors", (1.5, 0.2)),
                       LoraEntry("demo/motion-comfy.safetensors", 0.7)))
    compiled = _engine(model, demo_loras_dir, tmp_path, "on")
    plain = _engine(model, demo_loras_dir, tmp_path, "off")
    torch._dynamo.reset()
    _run(compiled, model, Stack())
    counts = dynamo_counts()

    rt = _run(compiled, model, scheduled)
    assert any(row.get("mode") == "runtime" for row in rt.loras)
    assert not rt.speed["compile"]["enabled"] and "runtime" in rt.speed["compile"]["reason"]
    assert any("set aside" in line for line in rt.speed["compile"]["changes"])
    assert np.array_equal(iio.imread(rt.path), iio.imread(_run(plain, model, scheduled).path))

    back = _run(compiled, model, STACKS[0])
    assert back.speed["compile"]["enabled"] and any("back in use" in line for line in back.speed["compile"]["changes"])
    assert np.array_equal(iio.imread(back.path), iio.imread(_run(plain, model, STACKS[0]).path))
    assert dynamo_counts() == counts, "taking the compiled blocks back recompiled"
