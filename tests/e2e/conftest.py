"""A launched `python app.py` on the demo models (session-wide) and a headless Chromium for it."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts" / "e2e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """URL of the app on fresh folders (shipped presets copied in), with a cap of 2 on the 1.3B demo."""
    root = tmp_path_factory.mktemp("app")
    shutil.copytree(ROOT / "presets", root / "presets")
    port = free_port()
    log = open(root / "app.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--server-port", str(port), "--models-dir", str(root / "models"),
         "--loras-dir", str(root / "loras"), "--presets-dir", str(root / "presets"),
         "--outputs-dir", str(root / "outputs"), "--data-dir", str(root / "data"),
         "--lora-cap", "demo-wan2.1-t2v-1.3b=2", "--queue-size", "4"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited: {(root / 'app.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/gradio_api/info", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("app did not start in 180 s")
            time.sleep(0.5)
    yield {"url": url, "root": root}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing; the end-to-end tests need Debian's chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, app_server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.goto(app_server["url"])
    pg.wait_for_selector("#generate", timeout=60_000)
    yield pg
    context.close()
