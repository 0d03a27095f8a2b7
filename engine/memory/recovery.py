"""Out-of-memory recovery: run an attempt, and after an OOM free memory and retry with the next heavier plan.

Memory is released OUTSIDE the `except` block: while the handler runs, the exception's traceback
still references every frame of the failed attempt (and with them the tensors it allocated), so
`gc.collect()` / `empty_cache()` inside the handler would free nothing.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import logging
from typing import Callable, TypeVar

from engine.memory.errors import NotEnoughMemory
from engine.memory.policy import OffloadPlan

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, or the RuntimeError some backends raise instead (MPS, cuBLAS allocation)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def release_memory() -> None:
    """Collect garbage, return cached blocks to the driver and freed heap pages to the OS."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def trim_heap() -> None:
    """Give freed C-heap pages back to the OS (glibc's malloc_trim). glibc keeps what a run freed in its
    per-thread arenas otherwise, so the RAM a user watches after a run, a model switch or an out-of-memory
    stays at the run's peak; a trim takes milliseconds."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def run_with_oom_recovery(attempt: Callable[[OffloadPlan], T], plan: OffloadPlan,
                          on_retry: Callable[[str], None] | None = None, *, context: str = "") -> T:
    """`attempt(plan)`; after an out-of-memory, `attempt(plan.escalated())` until sequential offload with
    VAE tiling has failed too, then NotEnoughMemory. `on_retry` gets "retried with group offload after
    out-of-memory". `context` (e.g. "1280x720, 81 frames, 2 LoRAs") goes into the final message."""
    tried: list[str] = []
    current: OffloadPlan | None = plan
    while current is not None:
        failure = None
        try:
            return attempt(current)
        except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(e):
                raise
            failure = str(e).splitlines()[0] if str(e) else type(e).__name__
        # Outside the handler: the failed attempt's frames are gone, so its tensors can be freed.
        tried.append(current.label)
        log.warning("out of memory with %s: %s", current.label, failure)
        release_memory()
        previous, current = current, current.escalated()
        if current is not None and on_retry is not None:
            same_mode = current.mode is previous.mode  # past sequential, only VAE tiling is left to add
            on_retry(f"retried with {current.mode.label}{' and VAE tiling' if same_mode else ''} after out-of-memory")
    where = f" at {context}" if context else ""
    raise NotEnoughMemory(
        f"out of GPU memory{where} even with the heaviest offload (tried: {', '.join(tried)}); "
        f"lower the frames or the resolution, or enable fewer LoRAs",
        tried=tuple(tried),
    )
