"""Live memory watch: a background poller (about 2 Hz) that records peak VRAM and RAM and feeds the UI gauge."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from engine.memory.nvml import NvmlAdapter, describe_nvml_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemorySample:
    seconds: float  # since the watch started
    vram_used_bytes: int | None  # whole device, as NVML sees it (None without NVML)
    vram_total_bytes: int | None
    ram_used_bytes: int | None  # system-wide
    ram_total_bytes: int | None
    process_rss_bytes: int | None
    peak_vram_bytes: int | None
    peak_ram_bytes: int | None  # peak of this process's RSS

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Sampler:
    """Reads (vram used, vram total, ram used, ram total, rss). Keeps one NVML session open for the watch."""

    def __init__(self, nvml: Any = None, psutil_module: Any = None, nvml_index: int = 0):
        self._adapter = nvml if isinstance(nvml, NvmlAdapter) else NvmlAdapter(nvml)
        self._psutil = psutil_module
        self._index = nvml_index
        self._handle = None
        self._nvml_ok = True

    def open(self) -> None:
        try:
            self._adapter.open()
            self._handle = self._adapter.handle(self._index)
        except ImportError:
            self._nvml_ok = False
        except self._adapter.error as e:
            log.info("memory watch without VRAM figures: %s", describe_nvml_error(e))
            self._nvml_ok = False

    def close(self) -> None:
        if self._nvml_ok:
            self._adapter.close()

    def read(self) -> tuple:
        vram_used = vram_total = None
        if self._nvml_ok and self._handle is not None:
            try:
                vram_total, vram_used, _ = self._adapter.memory(self._handle)
            except self._adapter.error as e:
                log.warning("VRAM reading failed, watch continues with RAM only: %s", describe_nvml_error(e))
                self._nvml_ok = False
        ps = self._psutil or __import__("psutil")
        vm = ps.virtual_memory()
        try:
            rss = int(ps.Process().memory_info().rss)
        except (getattr(ps, "Error", OSError), OSError):
            rss = None
        return vram_used, vram_total, int(vm.total - vm.available), int(vm.total), rss


class MemoryWatch:
    """`with MemoryWatch(callback) as watch: run()`; then watch.peak_vram_bytes / watch.peak_ram_bytes.

    The callback gets a MemorySample about every `interval_s` seconds from a daemon thread; a
    callback that raises is logged and does not stop the watch. The watch stops with the block.
    """

    def __init__(self, callback: Callable[[MemorySample], None] | None = None, interval_s: float = 0.5,
                 sampler: Sampler | None = None):
        self.callback = callback
        self.interval_s = interval_s
        self.sampler = sampler or Sampler()
        self.peak_vram_bytes: int | None = None
        self.peak_ram_bytes: int | None = None
        self.samples = 0
        self.last: MemorySample | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def __enter__(self) -> "MemoryWatch":
        self._started = time.perf_counter()
        self.sampler.open()
        self._tick()
        self._thread = threading.Thread(target=self._run, name="wanstack-memory-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1)
        self._tick()
        self.sampler.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._tick()

    def _tick(self) -> None:
        vram_used, vram_total, ram_used, ram_total, rss = self.sampler.read()
        if vram_used is not None:
            self.peak_vram_bytes = max(self.peak_vram_bytes or 0, vram_used)
        if rss is not None:
            self.peak_ram_bytes = max(self.peak_ram_bytes or 0, rss)
        self.samples += 1
        sample = MemorySample(
            seconds=round(time.perf_counter() - self._started, 3), vram_used_bytes=vram_used,
            vram_total_bytes=vram_total, ram_used_bytes=ram_used, ram_total_bytes=ram_total,
            process_rss_bytes=rss, peak_vram_bytes=self.peak_vram_bytes, peak_ram_bytes=self.peak_ram_bytes,
        )
        self.last = sample
        if self.callback is not None:
            try:
                self.callback(sample)
            except Exception:  # a broken gauge must not kill the run; log it with its traceback
                log.exception("memory watch callback failed")
