"""Memory snapshots: plain frozen values (GPUs from NVML, system RAM and this process's RSS from psutil).

`MemorySnapshot.capture()` is the only place that does I/O; policy code and tests take snapshots as
values. Pass `nvml=` (a pynvml-like module or an NvmlAdapter) and `psutil_module=` to capture from
stand-ins instead of the real driver.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from engine.memory.nvml import GpuProcess, NvmlAdapter, describe_nvml_error, nvml_error_kind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML index (PCI bus order)
    torch_index: int | None  # `cuda:N` for this process, matched by UUID; None when this process cannot see it
    uuid: str | None
    name: str | None
    total_bytes: int | None
    used_bytes: int | None
    free_bytes: int | None
    utilization_percent: int | None = None  # None = n/a (see notes)
    temperature_c: int | None = None
    mig_enabled: bool | None = None
    processes: tuple[GpuProcess, ...] | None = None
    notes: tuple[str, ...] = ()
    error: str | None = None  # set when the device itself failed (e.g. GPU is lost)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # JSON readers get "n/a" for a field the driver would not give, rather than a bare null.
        for key in ("uuid", "name", "total_bytes", "used_bytes", "free_bytes", "utilization_percent",
                    "temperature_c", "mig_enabled", "processes"):
            if d[key] is None:
                d[key] = "n/a"
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True)
class MemorySnapshot:
    available: bool  # True when GPU figures are known (from NVML, or given for planning)
    reason: str | None = None  # why GPU figures are missing
    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    ram_total_bytes: int | None = None
    ram_available_bytes: int | None = None
    process_rss_bytes: int | None = None
    source: str = "nvml"  # "nvml", "planned" (figures given by the user), or "none"
    taken_at: float = field(default_factory=time.time)

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def capture(cls, nvml: Any = None, psutil_module: Any = None, torch_uuids: Sequence[str] | None = None,
                environ: dict[str, str] | None = None) -> "MemorySnapshot":
        """Read NVML and psutil now. Never raises for driver trouble: returns an unavailable snapshot."""
        ram = read_ram(psutil_module)
        adapter = nvml if isinstance(nvml, NvmlAdapter) else NvmlAdapter(nvml)
        try:
            adapter.module
        except ImportError:
            return cls(available=False, reason="nvidia-ml-py (pynvml) is not installed, so VRAM cannot be read",
                       source="none", **ram)
        try:
            adapter.open()
        except adapter.error as e:
            return cls(available=False, reason=f"GPU memory cannot be read: {describe_nvml_error(e)}", source="none", **ram)
        try:
            return cls._read_devices(adapter, ram, torch_uuids, environ, psutil_module)
        finally:
            adapter.close()

    @classmethod
    def _read_devices(cls, adapter: NvmlAdapter, ram: dict, torch_uuids, environ, psutil_module) -> "MemorySnapshot":
        notes: list[str] = []
        driver = adapter.field(adapter.driver_version, "driver version", notes)
        try:
            count = adapter.device_count()
        except adapter.error as e:
            return cls(available=False, reason=f"NVML cannot list GPUs: {describe_nvml_error(e)}", source="none",
                       driver_version=driver, **ram)
        gpus = []
        for index in range(count):
            gpus.append(_read_gpu(adapter, index, _process_namer(psutil_module)))
        mapping = map_torch_indices(gpus, torch_uuids if torch_uuids is not None else torch_device_uuids(),
                                    environ if environ is not None else os.environ)
        gpus = [dataclasses.replace(g, torch_index=mapping.get(g.index)) for g in gpus]
        usable = [g for g in gpus if g.error is None and g.free_bytes is not None]
        if not usable:
            reason = "; ".join(f"GPU {g.index}: {g.error}" for g in gpus if g.error) or "NVML reports no GPU"
            return cls(available=False, reason=reason, gpus=tuple(gpus), driver_version=driver, source="none", **ram)
        return cls(available=True, gpus=tuple(gpus), driver_version=driver, **ram)

    @classmethod
    def unavailable(cls, reason: str, ram_total_bytes: int | None = None, ram_available_bytes: int | None = None,
                    process_rss_bytes: int | None = None) -> "MemorySnapshot":
        return cls(available=False, reason=reason, source="none", ram_total_bytes=ram_total_bytes,
                   ram_available_bytes=ram_available_bytes, process_rss_bytes=process_rss_bytes)

    @classmethod
    def planned(cls, free_vram_bytes: int | None, ram_bytes: int | None = None,
                base: "MemorySnapshot | None" = None) -> "MemorySnapshot":
        """A snapshot for a card you don't have: `plan --free-vram 16GiB [--ram 64GiB]`."""
        ram_total = ram_bytes if ram_bytes is not None else (base.ram_total_bytes if base else None)
        ram_avail = ram_bytes if ram_bytes is not None else (base.ram_available_bytes if base else None)
        if free_vram_bytes is None:
            if base is not None:
                return dataclasses.replace(base, ram_total_bytes=ram_total, ram_available_bytes=ram_avail)
            return cls.unavailable("no GPU figures given", ram_total, ram_avail)
        gpu = GpuInfo(index=0, torch_index=0, uuid=None, name="planned GPU", total_bytes=free_vram_bytes,
                      used_bytes=0, free_bytes=free_vram_bytes)
        return cls(available=True, gpus=(gpu,), ram_total_bytes=ram_total, ram_available_bytes=ram_avail,
                   source="planned")

    # ---- queries --------------------------------------------------------------------------
    def gpu(self, torch_index: int = 0) -> GpuInfo | None:
        """The GPU that `cuda:torch_index` runs on; the first healthy GPU when the mapping is unknown."""
        healthy = [g for g in self.gpus if g.error is None and g.free_bytes is not None]
        for g in healthy:
            if g.torch_index == torch_index:
                return g
        if healthy and all(g.torch_index is None for g in healthy):
            return healthy[0]
        return None

    def free_vram_bytes(self, torch_index: int = 0) -> int | None:
        g = self.gpu(torch_index) if self.available else None
        return g.free_bytes if g else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"available": self.available}
        if not self.available:
            d["reason"] = self.reason
        d.update(
            source=self.source,
            driver_version=self.driver_version or "n/a",
            gpus=[g.to_dict() for g in self.gpus],
            ram_total_bytes=self.ram_total_bytes,
            ram_available_bytes=self.ram_available_bytes,
            process_rss_bytes=self.process_rss_bytes,
        )
        return d


def _read_gpu(adapter: NvmlAdapter, index: int, process_name) -> GpuInfo:
    notes: list[str] = []
    try:
        handle = adapter.handle(index)
        total, used, free = adapter.memory(handle)
    except adapter.error as e:
        # Memory is the one figure the policy needs: without it this GPU is unusable, the others are not.
        return GpuInfo(index=index, torch_index=None, uuid=None, name=None, total_bytes=None, used_bytes=None,
                       free_bytes=None, error=describe_nvml_error(e))
    try:
        fields = adapter.read_fields(handle, notes, process_name)
    except adapter.error as e:
        if nvml_error_kind(e) != "NVMLError_GpuIsLost":
            raise
        return GpuInfo(index=index, torch_index=None, uuid=None, name=None, total_bytes=total, used_bytes=used,
                       free_bytes=None, notes=tuple(notes), error=describe_nvml_error(e))
    return GpuInfo(index=index, torch_index=None, total_bytes=total, used_bytes=used, free_bytes=free,
                   notes=tuple(notes), **fields)


def read_ram(psutil_module: Any = None) -> dict[str, int | None]:
    """System RAM and this process's resident set, from psutil."""
    try:
        ps = psutil_module or __import__("psutil")
    except ImportError:
        return dict(ram_total_bytes=None, ram_available_bytes=None, process_rss_bytes=None)
    vm = ps.virtual_memory()
    try:
        rss = int(ps.Process().memory_info().rss)
    except (getattr(ps, "Error", OSError), OSError) as e:  # locked-down hosts may refuse
        log.debug("process RSS unavailable: %s", e)
        rss = None
    return dict(ram_total_bytes=int(vm.total), ram_available_bytes=int(vm.available), process_rss_bytes=rss)


def _process_namer(psutil_module: Any):
    def name(pid: int) -> str | None:
        try:
            ps = psutil_module or __import__("psutil")
        except ImportError:
            return None
        try:
            return ps.Process(pid).name()
        except (getattr(ps, "Error", OSError), OSError):  # gone, or another user's process
            return None

    return name


# ---- NVML index <-> torch index -------------------------------------------------------------------
def _norm_uuid(uuid: str | None) -> str | None:
    if not uuid:
        return None
    u = str(uuid).strip().lower()
    for prefix in ("gpu-", "mig-"):
        u = u.removeprefix(prefix)
    return u


def torch_device_uuids() -> list[str] | None:
    """UUIDs of the CUDA devices this process sees, in torch order; None when torch is not loaded or has no CUDA.

    Only asks torch when it is already imported, so `vram --json` stays fast and `import engine` cheap.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    except (RuntimeError, AttributeError, AssertionError) as e:
        log.debug("torch device UUIDs unavailable: %s", e)
        return None


def map_torch_indices(gpus: Sequence[GpuInfo], torch_uuids: Sequence[str] | None,
                      environ: dict[str, str]) -> dict[int, int]:
    """NVML index -> torch index.

    NVML numbers GPUs in PCI bus order; CUDA (and so torch) numbers them fastest first unless
    CUDA_DEVICE_ORDER=PCI_BUS_ID, and only those listed in CUDA_VISIBLE_DEVICES, in that list's
    order. So the only reliable key is the UUID: torch's own device UUIDs when known, else the
    UUIDs or indices in CUDA_VISIBLE_DEVICES.
    """
    by_uuid = {_norm_uuid(g.uuid): g.index for g in gpus if g.uuid}
    if torch_uuids is not None:
        out = {}
        for t_index, uuid in enumerate(torch_uuids):
            n = _norm_uuid(uuid)
            match = by_uuid.get(n)
            if match is None and n:
                starts = [i for u, i in by_uuid.items() if u and u.startswith(n)]
                match = starts[0] if len(starts) == 1 else None
            if match is not None:
                out[match] = t_index
        return out
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    indices = [g.index for g in gpus]
    if visible is None:
        if len(gpus) > 1 and environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
            log.info("several GPUs and CUDA_DEVICE_ORDER is not PCI_BUS_ID: torch order may differ from NVML order")
        return {i: i for i in indices}
    out = {}
    for t_index, entry in enumerate(e.strip() for e in visible.split(",")):
        if not entry:
            break
        if entry.isdigit():
            if int(entry) not in indices:
                break  # CUDA stops at the first invalid entry
            out[int(entry)] = t_index
            continue
        n = _norm_uuid(entry)
        starts = [i for u, i in by_uuid.items() if u and n and u.startswith(n)]
        if len(starts) != 1:
            break
        out[starts[0]] = t_index
    return out
