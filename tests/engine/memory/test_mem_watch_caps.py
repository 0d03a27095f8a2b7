"""Live memory watch (fake sampler injected) and the LoRA-merge transient check."""
from __future__ import annotations

import threading
import time

import pynvml
import pytest

from engine.models.catalog import get_spec
from engine.memory import (MemorySnapshot, MemoryWatch, NotEnoughMemory, OffloadPlan, Workload, check_stack_transient,
                           choose_offload, require_stack_transient)
from engine.memory.watch import Sampler

GIB = 1 << 30


class ScriptedSampler:
    """Returns VRAM 1, 5, 3, 3, ... GiB and RSS 2, 2, 7, 4, ... GiB."""

    def __init__(self):
        self.vram = [1, 5, 3]
        self.rss = [2, 2, 7, 4]
        self.n = 0
        self.opened = self.closed = False

    def open(self):
        self.opened = True

    def close(self):
        self.closed = True

    def read(self):
        v = self.vram[min(self.n, len(self.vram) - 1)] * GIB
        r = self.rss[min(self.n, len(self.rss) - 1)] * GIB
        self.n += 1
        return v, 24 * GIB, 10 * GIB, 64 * GIB, r


def test_watch_records_peaks_feeds_the_callback_and_stops_with_the_block():
    samples = []
    sampler = ScriptedSampler()
    with MemoryWatch(samples.append, interval_s=0.01, sampler=sampler) as watch:
        deadline = time.time() + 5
        while len(samples) < 5 and time.time() < deadline:
            time.sleep(0.01)
    assert sampler.opened and sampler.closed
    assert not any(t.name == "wanstack-memory-watch" and t.is_alive() for t in threading.enumerate())
    assert watch.peak_vram_bytes == 5 * GIB and watch.peak_ram_bytes == 7 * GIB
    assert len(samples) >= 5 and samples[-1].peak_vram_bytes == 5 * GIB
    assert [s.vram_used_bytes for s in samples[:3]] == [GIB, 5 * GIB, 3 * GIB]
    assert samples[0].to_dict()["vram_total_bytes"] == 24 * GIB
    n = len(samples)
    time.sleep(0.05)
    assert len(samples) == n  # nothing after the block


def test_a_failing_callback_does_not_stop_the_watch():
    calls = []

    def boom(sample):
        calls.append(sample)
        raise ValueError("gauge broke")

    with MemoryWatch(boom, interval_s=0.01, sampler=ScriptedSampler()) as watch:
        deadline = time.time() + 5
        while len(calls) < 3 and time.time() < deadline:
            time.sleep(0.01)
    assert len(calls) >= 3 and watch.peak_ram_bytes == 7 * GIB


class NoDriver:
    NVMLError = pynvml.NVMLError

    def nvmlInit(self):
        raise pynvml.NVMLError_DriverNotLoaded()


def test_real_sampler_without_a_driver_still_watches_ram():
    with MemoryWatch(interval_s=0.01, sampler=Sampler(nvml=NoDriver())) as watch:
        time.sleep(0.03)
    assert watch.peak_vram_bytes is None
    assert watch.peak_ram_bytes and watch.peak_ram_bytes > 0
    assert watch.last.ram_total_bytes > 0


# ---- LoRA merge transient ----------------------------------------------------------------------------
def test_no_loras_always_fits():
    work = Workload(get_spec("wan2.2-t2v-a14b"), 720, 1280, 81)
    check = check_stack_transient(work, OffloadPlan(mode="none", usable_vram_bytes=0), MemorySnapshot.planned(0))
    assert check.fits and check.transient_bytes == 0


def test_merge_on_the_gpu_that_does_not_fit_is_refused_before_running():
    work = Workload(get_spec("wan2.1-t2v-1.3b"), 480, 832, 81, loras=2)
    snap = MemorySnapshot.planned(40 * GIB)
    plan = choose_offload(snap, work, "none")
    assert check_stack_transient(work, plan, snap).fits
    resident = work.estimate("none").phases["lora_merge"] - work.lora_merge_bytes()
    tight = OffloadPlan(mode="none", usable_vram_bytes=resident + work.lora_merge_bytes() // 2)
    check = check_stack_transient(work, tight, snap)
    assert not check.fits and check.where == "gpu"
    assert "working copy of the largest touched layer (FFN, 8960x1536)" in check.message
    assert "enable fewer LoRAs" in check.message
    with pytest.raises(NotEnoughMemory, match="merging 2 LoRA"):
        require_stack_transient(work, tight, snap)


def test_under_offload_the_merge_runs_in_ram():
    work = Workload(get_spec("wan2.2-t2v-a14b"), 720, 1280, 81, loras=1)
    plan = OffloadPlan(mode="group", usable_vram_bytes=15 * GIB)
    assert check_stack_transient(work, plan, MemorySnapshot.planned(16 * GIB, 64 * GIB)).where == "ram"
    short = check_stack_transient(work, plan, MemorySnapshot.planned(16 * GIB, GIB // 4))
    assert not short.fits and "system RAM" in short.message


@pytest.mark.gpu
def test_watch_sees_vram_grow_on_a_real_gpu():
    import torch

    snap = MemorySnapshot.capture()
    gpu = snap.gpu(0)
    with MemoryWatch(interval_s=0.05, sampler=Sampler(nvml_index=gpu.index)) as watch:
        block = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        time.sleep(0.2)
        del block
    assert watch.peak_vram_bytes >= gpu.used_bytes + 200 * 1024 * 1024
