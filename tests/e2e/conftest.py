"""A launched `python app.py` on the demo models (session-wide) and a headless Chromium for it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.apptools import launch_app, stop

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts" / "e2e"


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """URL of the app on fresh folders (shipped presets copied in), with a cap of 2 on the 1.3B demo."""
    root = tmp_path_factory.mktemp("app")
    proc, url = launch_app(root, "--lora-cap", "demo-wan2.1-t2v-1.3b=2", "--queue-size", "4", timeout_s=180)
    yield {"url": url, "root": root}
    stop(proc)


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
