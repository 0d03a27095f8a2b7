"""Fixtures for the reliability suite: a small real disk that fills up (tmpfs) and a launched app."""
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(root: Path, *extra: str, timeout_s: float = 240):
    """`python app.py` on fresh folders under `root`; returns (process, url). The caller stops it."""
    import shutil
    import time
    import urllib.request

    if not (root / "presets").exists():
        shutil.copytree(ROOT / "presets", root / "presets")
    port = free_port()
    log = open(root / "app.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--server-port", str(port), "--models-dir", str(root / "models"),
         "--loras-dir", str(root / "loras"), "--presets-dir", str(root / "presets"),
         "--outputs-dir", str(root / "outputs"), "--data-dir", str(root / "data"), *extra],
        cwd=root, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited: {(root / 'app.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/gradio_api/info", timeout=2)
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"app did not start in {timeout_s} s")
            time.sleep(0.5)


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def hostile_app(tmp_path_factory):
    """One launched app for the hostile-request and load tests: 1 MB upload/body limit, a queue of 3."""
    root = tmp_path_factory.mktemp("hostile-app")
    proc, url = launch_app(root, "--max-upload", "1mb", "--queue-size", "3")
    yield {"url": url, "root": root, "proc": proc}
    stop(proc)
