"""Fixtures for the reliability suite: a small real disk that fills up (tmpfs) and scripted child processes."""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest



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
