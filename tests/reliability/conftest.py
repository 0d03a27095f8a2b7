"""Fixtures for the reliability suite: a small real disk that fills up (tmpfs) and a launched app."""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
import pytest

from tests.apptools import launch_app, stop


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


@pytest.fixture(scope="session")
def hostile_app(tmp_path_factory):
    """One launched app for the hostile-request and load tests: 1 MB upload/body limit, a queue of 3."""
    root = tmp_path_factory.mktemp("hostile-app")
    proc, url = launch_app(root, "--max-upload", "1mb", "--queue-size", "3")
    yield {"url": url, "root": root, "proc": proc}
    stop(proc)
