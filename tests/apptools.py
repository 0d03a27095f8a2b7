"""Launch and stop `python app.py` on fresh folders: shared by the e2e and reliability suites (a module of
its own: test folders cannot import from one another's conftest)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
