"""The one atomic-write helper: temp name beside the target, fsync, check, os.replace, fsync the folder.

Every temp name starts with `.wanstack-tmp.<pid>.`, so a temp file or folder left by a killed process
is recognised and removed by `clean_stale_temps` (the app runs it on its folders at startup) and never
mistaken for a result. A reader of the final name sees the old content or the new, never half of it.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

TMP_PREFIX = ".wanstack-tmp."


def temp_name_for(path: Path) -> Path:
    """A fresh temp path beside `path` (same folder, so the final os.replace is atomic)."""
    # ends in .part, so no listing by suffix (*.json, *.safetensors, *.mp4) ever picks one up
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}.{secrets.token_hex(4)}.{path.name}.part")


def is_temp_name(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike, *, verify: Callable[[Path], None] | None = None,
                directory: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; write it in the body. On success `verify(tmp)` runs (it raises to
    refuse the result), the temp is fsynced and renamed onto `path`; on any failure it is removed.

    `directory=True` yields a fresh empty folder instead of a file name (renamed as a whole; the final
    name must not exist as a non-empty folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name_for(path)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if verify is not None:
            verify(tmp)
        if not directory:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kw) -> Path:
    dump_kw.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dump_kw) + "\n")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Remove temp files/folders left in `folder` by processes that no longer run. Returns what was removed.

    A temp whose writer is still alive (another CLI run, this process) is left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed: list[Path] = []
    walker = os.walk(folder) if recursive else [(str(folder), [d.name for d in folder.iterdir() if d.is_dir()],
                                                  [f.name for f in folder.iterdir() if not f.is_dir()])]
    for root, dirs, files in walker:
        for name in list(dirs) + list(files):
            if not is_temp_name(name):
                continue
            try:
                pid = int(name[len(TMP_PREFIX):].split(".", 1)[0])
            except ValueError:
                continue
            if _pid_alive(pid):
                continue
            p = Path(root) / name
            _remove(p)
            removed.append(p)
            if name in dirs:
                dirs.remove(name)
    for p in removed:
        log.info("removed %s, left by an interrupted write", p)
    return removed
