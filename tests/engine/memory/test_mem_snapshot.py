"""NVML adapter and snapshots: every NVML failure kind becomes a reason, never a crash (fakes injected, no globals)."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pynvml
import pytest

from engine.memory import MemorySnapshot
from engine.memory.nvml import NvmlAdapter, nvml_error_kind
from engine.memory.snapshot import GpuInfo, map_torch_indices

GIB = 1 << 30


class FakePsutil:
    """psutil stand-in: fixed RAM, one named process."""

    Error = type("Error", (Exception,), {})

    def __init__(self, total=64 * GIB, available=40 * GIB, rss=3 * GIB):
        self._vm = SimpleNamespace(total=total, available=available)
        self._rss = rss

    def virtual_memory(self):
        return self._vm

    def Process(self, pid=None):
        if pid == 999:
            raise self.Error("no such process")
        return SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=self._rss), name=lambda: f"proc{pid}")


class FakeNvml:
    """A pynvml-like object. `fail` maps a function name to an NVMLError instance raised by it
    (optionally for one device index only: ("nvmlDeviceGetMemoryInfo", 1))."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus=None, fail=None):
        self.gpus = gpus if gpus is not None else [
            dict(uuid="GPU-aaaa-1111", name="RTX 4090", total=24 * GIB, used=2 * GIB),
            dict(uuid="GPU-bbbb-2222", name="RTX 3060", total=12 * GIB, used=1 * GIB),
        ]
        self.fail = fail or {}
        self.shutdown_called = False

    def _check(self, fn, index=None):
        err = self.fail.get((fn, index)) or self.fail.get(fn)
        if err is not None:
            raise err

    def nvmlInit(self):
        self._check("nvmlInit")

    def nvmlShutdown(self):
        self.shutdown_called = True

    def nvmlSystemGetDriverVersion(self):
        self._check("nvmlSystemGetDriverVersion")
        return "560.35.03"

    def nvmlDeviceGetCount(self):
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        self._check("nvmlDeviceGetHandleByIndex", i)
        return i

    def nvmlDeviceGetMemoryInfo(self, h):
        self._check("nvmlDeviceGetMemoryInfo", h)
        g = self.gpus[h]
        return SimpleNamespace(total=g["total"], used=g["used"], free=g["total"] - g["used"])

    def nvmlDeviceGetUUID(self, h):
        self._check("nvmlDeviceGetUUID", h)
        return self.gpus[h]["uuid"]

    def nvmlDeviceGetName(self, h):
        self._check("nvmlDeviceGetName", h)
        return self.gpus[h]["name"].encode()  # old pynvml returned bytes

    def nvmlDeviceGetUtilizationRates(self, h):
        self._check("nvmlDeviceGetUtilizationRates", h)
        return SimpleNamespace(gpu=37, memory=10)

    def nvmlDeviceGetTemperature(self, h, sensor):
        self._check("nvmlDeviceGetTemperature", h)
        return 61

    def nvmlDeviceGetMigMode(self, h):
        self._check("nvmlDeviceGetMigMode", h)
        return (0, 0)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        self._check("nvmlDeviceGetComputeRunningProcesses", h)
        return [SimpleNamespace(pid=4242, usedGpuMemory=GIB), SimpleNamespace(pid=999, usedGpuMemory=None)]


def capture(fake, **kw):
    kw.setdefault("torch_uuids", None)
    kw.setdefault("environ", {})
    return MemorySnapshot.capture(nvml=fake, psutil_module=FakePsutil(), **kw)


def test_healthy_gpus_report_every_field():
    snap = capture(FakeNvml())
    assert snap.available and snap.reason is None
    assert snap.driver_version == "560.35.03"
    g0 = snap.gpus[0]
    assert (g0.name, g0.total_bytes, g0.used_bytes, g0.free_bytes) == ("RTX 4090", 24 * GIB, 2 * GIB, 22 * GIB)
    assert (g0.utilization_percent, g0.temperature_c, g0.mig_enabled) == (37, 61, False)
    assert [(p.pid, p.used_bytes, p.name) for p in g0.processes] == [(4242, GIB, "proc4242"), (999, None, None)]
    assert snap.free_vram_bytes(0) == 22 * GIB and snap.free_vram_bytes(1) == 11 * GIB
    assert (snap.ram_total_bytes, snap.ram_available_bytes, snap.process_rss_bytes) == (64 * GIB, 40 * GIB, 3 * GIB)
    json.dumps(snap.to_dict())


@pytest.mark.parametrize("kind, words", [
    ("NVMLError_LibraryNotFound", "libnvidia-ml"),
    ("NVMLError_DriverNotLoaded", "kernel driver is not loaded"),
    ("NVMLError_NoPermission", "permission"),
])
def test_init_failures_give_an_unavailable_snapshot_with_the_reason(kind, words):
    fake = FakeNvml(fail={"nvmlInit": getattr(pynvml, kind)()})
    snap = capture(fake)
    assert not snap.available
    assert words in snap.reason and kind.removeprefix("NVMLError_") in snap.reason
    assert snap.gpus == () and snap.free_vram_bytes() is None
    assert snap.ram_total_bytes == 64 * GIB  # RAM is still reported
    d = snap.to_dict()
    assert d["available"] is False and d["reason"] == snap.reason


def test_not_supported_under_mig_makes_only_that_field_na():
    err = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)  # pynvml maps the code to its subclass
    assert nvml_error_kind(err) == "NVMLError_NotSupported"
    fake = FakeNvml(fail={"nvmlDeviceGetUtilizationRates": err, "nvmlDeviceGetComputeRunningProcesses": err})
    snap = capture(fake)
    assert snap.available
    g0 = snap.gpus[0]
    assert g0.utilization_percent is None and g0.processes is None
    assert g0.temperature_c == 61 and g0.free_bytes == 22 * GIB
    assert any(n.startswith("utilisation: n/a") and "MIG" in n for n in g0.notes)
    d = g0.to_dict()
    assert d["utilization_percent"] == "n/a" and d["processes"] == "n/a" and d["temperature_c"] == 61


def test_a_lost_gpu_is_reported_and_the_other_stays_usable():
    fake = FakeNvml(fail={("nvmlDeviceGetMemoryInfo", 0): pynvml.NVMLError_GpuIsLost()})
    snap = capture(fake)
    assert snap.available
    assert "fallen off the bus" in snap.gpus[0].error and snap.gpus[0].free_bytes is None
    assert snap.gpus[1].error is None
    assert snap.gpu(1).index == 1


def test_gpu_lost_while_reading_a_field_marks_the_gpu_not_the_field():
    fake = FakeNvml(gpus=[dict(uuid="GPU-a", name="A", total=8 * GIB, used=0)],
                    fail={("nvmlDeviceGetTemperature", 0): pynvml.NVMLError_GpuIsLost()})
    snap = capture(fake)
    assert not snap.available
    assert "GpuIsLost" in snap.reason and "GPU 0" in snap.reason
    assert fake.shutdown_called


def test_count_failure_and_unknown_errors_do_not_crash():
    fake = FakeNvml(fail={"nvmlDeviceGetCount": pynvml.NVMLError_Unknown()})
    snap = capture(fake)
    assert not snap.available and "cannot list GPUs" in snap.reason


def test_torch_order_follows_uuids_not_nvml_order():
    # torch sees the 3060 first (e.g. CUDA_VISIBLE_DEVICES reordered them)
    snap = capture(FakeNvml(), torch_uuids=["bbbb-2222", "aaaa-1111"])
    assert [g.torch_index for g in snap.gpus] == [1, 0]
    assert snap.gpu(0).name == "RTX 3060"
    assert snap.free_vram_bytes(0) == 11 * GIB


def test_cuda_visible_devices_mapping_without_torch():
    gpus = [GpuInfo(i, None, u, "x", 1, 0, 1) for i, u in enumerate(["GPU-aaaa", "GPU-bbbb", "GPU-cccc"])]
    assert map_torch_indices(gpus, None, {}) == {0: 0, 1: 1, 2: 2}
    assert map_torch_indices(gpus, None, {"CUDA_VISIBLE_DEVICES": "2,0"}) == {2: 0, 0: 1}
    assert map_torch_indices(gpus, None, {"CUDA_VISIBLE_DEVICES": "GPU-bbbb"}) == {1: 0}
    assert map_torch_indices(gpus, None, {"CUDA_VISIBLE_DEVICES": "1,7,0"}) == {1: 0}  # CUDA stops at 7
    assert map_torch_indices(gpus, None, {"CUDA_VISIBLE_DEVICES": ""}) == {}
    unmapped = MemorySnapshot(available=True, gpus=tuple(gpus))
    assert unmapped.gpu(0).index == 0  # mapping unknown: the first healthy GPU


def test_planned_snapshot_for_a_card_you_do_not_have():
    snap = MemorySnapshot.planned(16 * GIB, 64 * GIB)
    assert snap.available and snap.source == "planned"
    assert snap.free_vram_bytes() == 16 * GIB and snap.ram_available_bytes == 64 * GIB


def test_adapter_imports_pynvml_lazily_and_real_capture_never_raises():
    adapter = NvmlAdapter()
    assert adapter._module is None
    snap = MemorySnapshot.capture()
    if not snap.available:
        assert snap.reason
    assert snap.ram_total_bytes and snap.ram_total_bytes > 0


def test_importing_the_package_loads_neither_torch_nor_pynvml():
    code = ("import sys, engine.memory, engine.memory.offload, engine.cli.memory; "
            "print(sorted(m for m in ('torch', 'pynvml', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_vram_cli_json(capsys):
    from engine.__main__ import main

    assert main(["vram", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert isinstance(d["available"], bool)
    assert d["ram_total_bytes"] > 0
    if not d["available"]:
        assert d["reason"]


@pytest.mark.gpu
def test_real_nvml_sees_the_cuda_device():
    import torch

    torch.cuda.init()
    snap = MemorySnapshot.capture()
    assert snap.available, snap.reason
    g = snap.gpu(torch.cuda.current_device())
    assert g is not None and g.total_bytes == pytest.approx(torch.cuda.get_device_properties(0).total_memory, rel=0.05)


def test_facade_snapshot_takes_injected_fakes():
    import engine.memory

    snap = engine.memory.snapshot(nvml=FakeNvml(), psutil_module=FakePsutil())
    assert snap.available and snap.gpus[0].name == "RTX 4090"
