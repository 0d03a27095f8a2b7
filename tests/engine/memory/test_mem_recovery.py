"""OOM recovery: injected torch.OutOfMemoryError -> retry with the next heavier plan; memory released; clear failure."""
from __future__ import annotations

import weakref

import pytest
import torch

from engine.memory import NotEnoughMemory, OffloadPlan, run_with_oom_recovery
from engine.memory.offload import applied_mode, apply_plan, undo_plan
from engine.types import WanStackError

CPU = torch.device("cpu")


def oom(msg="CUDA out of memory. Tried to allocate 2.00 GiB"):
    return torch.OutOfMemoryError(msg)


def test_first_oom_retries_with_the_next_mode():
    seen, retries = [], []

    def attempt(plan):
        seen.append((plan.mode.value, plan.vae_tiling))
        if len(seen) == 1:
            raise oom()
        return "video"

    assert run_with_oom_recovery(attempt, OffloadPlan(mode="model"), retries.append) == "video"
    assert seen == [("model", False), ("group", True)]
    assert retries == ["retried with group offload after out-of-memory"]


def test_always_failing_ends_in_a_clear_message_with_memory_released():
    alive, retries = [], []

    def attempt(plan):
        big = torch.ones(4_000_000)  # 16 MB held by this frame when the error is raised
        alive.append(weakref.ref(big))
        raise oom()

    with pytest.raises(NotEnoughMemory) as info:
        run_with_oom_recovery(attempt, OffloadPlan(mode="none"), retries.append, context="1280x720, 81 frames")
    msg = str(info.value)
    assert isinstance(info.value, WanStackError)
    assert "at 1280x720, 81 frames" in msg
    assert ("tried: no offload, model offload with VAE tiling, group offload with VAE tiling, "
            "sequential offload with VAE tiling") in msg
    assert "lower the frames or the resolution, or enable fewer LoRAs" in msg
    assert info.value.tried == ("no offload", "model offload with VAE tiling", "group offload with VAE tiling",
                                "sequential offload with VAE tiling")
    assert retries == ["retried with model offload after out-of-memory", "retried with group offload after out-of-memory",
                       "retried with sequential offload after out-of-memory"]
    assert len(alive) == 4 and all(ref() is None for ref in alive)  # no failed attempt's tensors survive
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_sequential_without_tiling_gets_one_more_try_with_tiling():
    retries = []
    calls = []

    def attempt(plan):
        calls.append(plan.vae_tiling)
        if not plan.vae_tiling:
            raise oom()
        return 1

    assert run_with_oom_recovery(attempt, OffloadPlan(mode="sequential"), retries.append) == 1
    assert retries == ["retried with sequential offload and VAE tiling after out-of-memory"]


def test_other_errors_are_not_retried():
    calls = []

    def attempt(plan):
        calls.append(plan)
        raise RuntimeError("shape mismatch in block 3")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_oom_recovery(attempt, OffloadPlan(mode="none"))
    assert len(calls) == 1


@pytest.mark.slow
def test_demo_pipeline_recovers_from_an_oom_in_the_transformer_forward():
    from engine.models.demo import build_demo_pipeline

    pipe = build_demo_pipeline("wan2.1-t2v-1.3b", seed=0)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a red cat", height=32, width=32, num_frames=5, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="pt", max_sequence_length=16).frames

    apply_plan(pipe, OffloadPlan(mode="none"), CPU)
    expected = run()

    failures = {"left": 1}

    def fail_once(module, args):
        if failures["left"]:
            failures["left"] -= 1
            raise oom()

    handle = pipe.transformer.register_forward_pre_hook(fail_once)
    retries, modes = [], []

    def attempt(plan):
        apply_plan(pipe, plan, CPU)
        modes.append(applied_mode(pipe)["mode"])
        return run()

    try:
        video = run_with_oom_recovery(attempt, OffloadPlan(mode="group"), retries.append)
    finally:
        handle.remove()
        undo_plan(pipe)
    assert modes == ["group", "sequential"]
    assert retries == ["retried with sequential offload after out-of-memory"]
    assert torch.equal(video, expected)  # a finished video, the same as without offload
