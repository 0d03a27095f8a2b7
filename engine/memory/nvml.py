"""A small adapter over NVML (nvidia-ml-py's `pynvml`): imported lazily, owned by one object, never crashes.

Every NVML failure is turned into a sentence: a failure to start NVML makes the whole snapshot
"unavailable" with that reason; a failure of one query (utilisation under MIG, processes on
some drivers) makes only that field "n/a", with a note saying why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

# NVML error class name -> what it means for the user. Keyed by class name so any object that
# raises pynvml's NVMLError subclasses (the real module or a test double) is understood.
NVML_ERROR_REASONS = {
    "NVMLError_LibraryNotFound": "the NVIDIA driver library (libnvidia-ml) was not found, so there is no usable NVIDIA driver on this machine",
    "NVMLError_DriverNotLoaded": "the NVIDIA kernel driver is not loaded; check the driver install with `nvidia-smi`",
    "NVMLError_NoPermission": "no permission to query the NVIDIA driver as this user",
    "NVMLError_GpuIsLost": "the GPU has fallen off the bus (GPU is lost); the machine needs a reboot",
    "NVMLError_NotSupported": "not supported on this GPU or in this mode (for example under MIG)",
    "NVMLError_FunctionNotFound": "the installed NVIDIA driver is too old for this query",
    "NVMLError_Uninitialized": "NVML was not initialised",
    "NVMLError_InsufficientPower": "the GPU's power cables are not connected properly",
    "NVMLError_Timeout": "the NVIDIA driver did not answer in time",
}


def nvml_error_kind(exc: BaseException) -> str:
    """'NVMLError_GpuIsLost' etc.: the most specific NVML error class name in the exception's MRO."""
    for cls in type(exc).__mro__:
        if cls.__name__.startswith("NVMLError_"):
            return cls.__name__
    return type(exc).__name__


def describe_nvml_error(exc: BaseException) -> str:
    kind = nvml_error_kind(exc)
    reason = NVML_ERROR_REASONS.get(kind)
    if reason is None:
        reason = str(exc) or kind
    return f"{reason} ({kind.removeprefix('NVMLError_')})"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None: the driver does not say (Windows WDDM, some containers)
    name: str | None = None


class NvmlAdapter:
    """Owns one NVML session. `module` is pynvml or a stand-in with the same functions and error classes."""

    def __init__(self, module: Any = None):
        self._module = module
        self._open = False

    @property
    def module(self) -> Any:
        if self._module is None:
            import pynvml  # lazy: importing engine must not touch the driver

            self._module = pynvml
        return self._module

    @property
    def error(self) -> type[BaseException]:
        return getattr(self.module, "NVMLError", RuntimeError)

    def open(self) -> None:
        if not self._open:
            self.module.nvmlInit()
            self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self.module.nvmlShutdown()
            except self.error as e:
                log.debug("nvmlShutdown failed: %s", describe_nvml_error(e))

    def __enter__(self) -> "NvmlAdapter":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- queries (raise the module's NVMLError; callers decide what a failure means) ----------
    def driver_version(self) -> str:
        return _text(self.module.nvmlSystemGetDriverVersion())

    def device_count(self) -> int:
        return int(self.module.nvmlDeviceGetCount())

    def handle(self, index: int) -> Any:
        return self.module.nvmlDeviceGetHandleByIndex(index)

    def memory(self, handle: Any) -> tuple[int, int, int]:
        """(total, used, free) bytes."""
        info = self.module.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total), int(info.used), int(info.free)

    def field(self, fn: Callable[[], Any], label: str, notes: list[str]) -> Any:
        """One optional query: its value, or None with a note. GpuIsLost is not swallowed here."""
        try:
            return fn()
        except self.error as e:
            if nvml_error_kind(e) == "NVMLError_GpuIsLost":
                raise
            notes.append(f"{label}: n/a, {describe_nvml_error(e)}")
            return None

    def read_fields(self, handle: Any, notes: list[str], process_name: Callable[[int], str | None]) -> dict:
        m = self.module
        uuid = self.field(lambda: _text(m.nvmlDeviceGetUUID(handle)), "uuid", notes)
        name = self.field(lambda: _text(m.nvmlDeviceGetName(handle)), "name", notes)
        util = self.field(lambda: int(m.nvmlDeviceGetUtilizationRates(handle).gpu), "utilisation", notes)
        temp = self.field(
            lambda: int(m.nvmlDeviceGetTemperature(handle, getattr(m, "NVML_TEMPERATURE_GPU", 0))), "temperature", notes
        )
        mig = self.field(lambda: bool(m.nvmlDeviceGetMigMode(handle)[0]), "MIG mode", notes)

        def processes():
            rows = m.nvmlDeviceGetComputeRunningProcesses(handle)
            out = []
            for p in rows:
                used = getattr(p, "usedGpuMemory", None)
                out.append(GpuProcess(pid=int(p.pid), used_bytes=int(used) if used is not None else None,
                                      name=process_name(int(p.pid))))
            return tuple(out)

        procs = self.field(processes, "processes", notes)
        return dict(uuid=uuid, name=name, utilization_percent=util, temperature_c=temp, mig_enabled=mig,
                    processes=procs)
