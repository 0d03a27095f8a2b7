"""Fixtures for the reliability suite: a small real disk that fills up (tmpfs) and scripted child processes."""
from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size_bytes) -> a folder on a tmpfs of that size (a real ENOSPC when it fills).

    Needs root (CI and the dev machines run as root); elsewhere the test is skipped with the reason.
    """
    mounted: list[Path] = []

    def make(size_bytes: int) -> Path:
        where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path) -> None:
    """Fill the disk under `folder` to the last byte."""
    for name, chunk in (("filler", 4096), ("filler-tail", 1)):
        try:
            with open(folder / name, "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * chunk)
        except OSError:
            pass


def python(code: str, **kw) -> subprocess.Popen:
    """A child Python running `code` with the repo importable."""
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, **kw)
