"""A damaged model in the page: one error box naming the file and the fix, then a good model runs; another
page's gallery shows both runs without a click (it re-lists when the outputs folder changes)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from test_browser import pick, wait_text
from test_run_panel import COUNT_ERRORS_JS
from tests.apptools import launch_app, stop

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "e2e"
SHOTS = Path("/tmp/s3-fixes-shots")
GOOD = "demo-wan2.1-t2v-1.3b"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def damaged_app(app_server, tmp_path_factory):
    """A second app whose models/ holds a copy of the demo 1.3B with its transformer cut short; the demo
    models come from the session app's data folder (already built)."""
    root = tmp_path_factory.mktemp("damaged-app")
    demo = app_server["root"] / "data" / "demo-models" / GOOD
    shutil.copytree(demo, root / "models" / "damaged-demo")
    weights = root / "models" / "damaged-demo" / WEIGHTS
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    proc, url = launch_app(root, "--data-dir", str(app_server["root"] / "data"), timeout_s=180)
    yield {"url": url, "root": root, "size": size}
    stop(proc)


def _open(browser, url):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#generate", timeout=60_000)
    return context, page


def _thumbs(page) -> int:
    return page.locator("#history img").count()


def _wait_thumbs(page, count: int, timeout_s: float = 30) -> float:
    started = time.monotonic()
    while _thumbs(page) < count:
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"the other page's gallery shows {_thumbs(page)} runs, expected {count}")
        page.wait_for_timeout(200)
    return time.monotonic() - started


def test_damaged_model_says_which_file_then_a_good_model_runs(browser, damaged_app):
    SHOTS.mkdir(parents=True, exist_ok=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ctx_a, page = _open(browser, damaged_app["url"])
    ctx_b, other = _open(browser, damaged_app["url"])  # another tab, left alone on its gallery
    try:
        assert _thumbs(other) == 0
        pick(page, "model-picker", "damaged-demo")
        wait_text(page, "#model-note", "1 expert")
        page.fill("#prompt textarea", "a fox on a damaged model")
        page.click("#generate")
        error = wait_text(page, "#run-error", "download it again", timeout_s=120)
        weights = damaged_app["root"] / "models" / "damaged-demo" / WEIGHTS
        size = damaged_app["size"]
        assert f"{weights} is truncated or not a safetensors file (expected {size} bytes, found {size // 2})" in error
        assert "Traceback" not in error and "OSError" not in error
        wait_text(page, "#run-status", "Run failed")
        assert page.evaluate(COUNT_ERRORS_JS) == [error.strip()[:120]]  # one message, in the error box
        page.screenshot(path=str(SHOTS / "damaged-model-error-1280x800.png"))
        page.screenshot(path=str(ARTIFACTS / "damaged-model-error.png"))
        waited_failed = _wait_thumbs(other, 1)  # the failed run's record, no click in the other tab

        pick(page, "model-picker", GOOD)
        wait_text(page, "#model-note", "random weights")
        page.click("#generate")
        wait_text(page, "#run-status", "Done", timeout_s=300)
        assert page.inner_text("#run-error").strip() == ""
        waited_done = _wait_thumbs(other, 2)
        other.screenshot(path=str(SHOTS / "other-tab-gallery-1280x800.png"))
        print(f"other tab's gallery caught up {waited_failed:.1f} s and {waited_done:.1f} s after the runs")
    finally:
        ctx_a.close()
        ctx_b.close()
