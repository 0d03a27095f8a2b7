"""Faults during a run: out-of-memory at step k (retried with heavier offload, same video), NVML failing
mid-run, a LoRA deleted between listing and use, and a cancelled run followed by one equal to a fresh run."""
from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pynvml
import pytest
import torch

from engine.facade import Engine, Settings
from engine.lora.errors import LoraFormatError
from engine.port import Memory, Retry, Step
from engine.types import GenerationCancelled, GenerationRequest, LoraEntry, RequestError, Stack
from engine.port import Memory, Retry, Step

pytestmark = pytest.mark.slow
ARCH = "wan2.1-t2v-1.3b"


def engine_for(model, tmp_path, loras=None) -> Engine:
    return Engine(Settings(models_dir=model.parent, outputs_dir=tmp_path / "out", loras_dir=loras or tmp_path / "l"))


def frames(path) -> np.ndarray:
    return iio.imread(path)


def test_out_of_memory_at_step_k_is_retried_with_heavier_offload(demo_model, tmp_path):
    model = demo_model(ARCH)
    engine = engine_for(model, tmp_path)
    req = GenerationRequest(model=model.name, prompt="a cat", steps=3, seed=11)
    reference = frames(engine.generate(req).path)
    transformer = engine._generator._pipe.transformer
    original, calls = transformer.forward, {"n": 0}
    fail_at = 3  # two transformer calls per step (guidance): the first call of step 2

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (injected at step 2)")
        return original(*args, **kwargs)

    transformer.forward = forward
    steps, retries = [], []

    def on_event(event):
        if isinstance(event, Step):
            steps.append(event.step)
        elif isinstance(event, Retry):
            retries.append(event.message)

    result = engine.generate(req, on_event)
    assert calls["n"] > fail_at and steps[:1] == [1] and retries == ["retried with model offload after out-of-memory"]
    assert result.offload == "model"
    assert np.array_equal(frames(result.path), reference)


class FlakyNvml:
    """pynvml stand-in: one GPU whose memory reads work `ok_reads` times, then the GPU is lost."""

    NVMLError = pynvml.NVMLError

    def __init__(self, ok_reads: int):
        self.ok_reads = ok_reads
        self.reads = 0

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetMemoryInfo(self, h):
        self.reads += 1
        if self.reads > self.ok_reads:
            raise pynvml.NVMLError_GpuIsLost()
        from types import SimpleNamespace

        return SimpleNamespace(total=8 << 30, used=(1 << 30) + self.reads, free=(7 << 30) - self.reads)


def test_nvml_failing_mid_run_does_not_stop_the_run(demo_model, tmp_path, monkeypatch):
    from engine import memory
    from engine.memory.watch import MemoryWatch, Sampler

    fake = FlakyNvml(ok_reads=2)

    class FlakyWatch(MemoryWatch):
        def __init__(self, callback=None, interval_s=0.05, sampler=None):
            super().__init__(callback, interval_s=0.05, sampler=Sampler(nvml=fake))

    monkeypatch.setattr(memory, "MemoryWatch", FlakyWatch)
    model = demo_model(ARCH)
    samples = []
    result = engine_for(model, tmp_path).generate(
        GenerationRequest(model=model.name, prompt="a cat", steps=3, seed=2),
        lambda event: samples.append(event.sample) if isinstance(event, Memory) else None)
    assert fake.reads > 2  # the GPU was lost during the run
    assert samples[0].vram_used_bytes is not None and samples[-1].vram_used_bytes is None
    assert samples[-1].ram_used_bytes and result.peak_vram_bytes == (1 << 30) + 2
    assert frames(result.path).shape[0] == result.frames


def test_a_lora_deleted_between_listing_and_use(demo_model, demo_loras_dir, tmp_path):
    import shutil

    model = demo_model(ARCH)
    loras = tmp_path / "loras"
    shutil.copytree(demo_loras_dir, loras)
    engine = engine_for(model, tmp_path, loras)
    listed = {v.file for v in engine.loras("demo-wan2.1-t2v-1.3b") if v.compatible}
    victim = next(f for f in sorted(listed) if "style" in f)
    (loras / victim).unlink()
    with pytest.raises((LoraFormatError, RequestError), match=victim.split("/")[-1]):
        engine.generate(GenerationRequest(model=model.name, prompt="x", steps=1, seed=1,
                                          stack=Stack((LoraEntry(victim, 0.8),))))
    assert victim not in {v.file for v in engine.loras("demo-wan2.1-t2v-1.3b")}
    result = engine.generate(GenerationRequest(model=model.name, prompt="x", steps=1, seed=1))  # others unaffected
    assert result.loras == []


def test_cancelled_run_then_a_run_equal_to_a_fresh_one(demo_model, demo_loras_dir, tmp_path):
    model = demo_model(ARCH)
    lora = next(p.relative_to(demo_loras_dir).as_posix() for p in sorted(demo_loras_dir.rglob("*style*")))
    req = GenerationRequest(model=model.name, prompt="a red fox", steps=4, seed=123,
                            stack=Stack((LoraEntry(lora, 0.9),)))
    fresh = frames(engine_for(model, tmp_path / "a", demo_loras_dir).generate(req).path)

    engine = engine_for(model, tmp_path / "b", demo_loras_dir)

    def cancel_at_2(event):
        if isinstance(event, Step) and event.step == 2:
            engine.cancel()

    with pytest.raises(GenerationCancelled, match="after step 2"):
        engine.generate(req, cancel_at_2)
    assert not list((tmp_path / "b" / "out").glob("*.mp4")) if (tmp_path / "b" / "out").exists() else True
    again = frames(engine.generate(req).path)
    assert np.array_equal(again, fresh)
