"""The run panel in Chromium, looked at mid-run and not only before and after: one progress indicator
while a 20-step run goes, exactly one error message after a failure, and screenshots of the page at
1280x800 and 1920x1080 before, during and after a run (test-artifacts/e2e/run-*.png)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from test_browser import pick, wait_text

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "e2e"
pytestmark = [pytest.mark.slow, pytest.mark.e2e]
SHOTS = Path("/tmp/s3-fixes-shots")
VIEWPORTS = {"1280x800": (1280, 800), "1920x1080": (1920, 1080)}

# Everything on the page that shows progress: our run panel's bar, and every progress/ETA/timer element
# Gradio's status trackers draw over components. Only the visible ones count.
COUNT_PROGRESS_JS = """
() => {
  const sel = ['[role=progressbar]', '.progress-bar', '.progress-level', '.eta-bar', '.progress-text',
               '.meta-text', '.meta-text-center', '.loader', '.wrap.generating', '.wrap.pending'];
  const seen = new Set();
  for (const el of document.querySelectorAll(sel.join(','))) {
    const r = el.getBoundingClientRect();
    // drawn at all: a size, and neither it nor an ancestor hidden or transparent (Gradio hides trackers so)
    if (r.width > 0 && r.height > 0 && el.checkVisibility({opacityProperty: true, visibilityProperty: true}))
      seen.add(el.closest('[role=progressbar]') || el);
  }
  return Array.from(seen).map(el => (el.id || el.className || el.tagName).toString().slice(0, 60));
}
"""
# Error messages: our error box, Gradio's error toasts and the "Error" badges of its status trackers.
COUNT_ERRORS_JS = """
() => {
  const sel = ['[role=alert]', '.toast-body.error', '.toast-wrap .error', '.wrap .error', '.error-message'];
  const out = [];
  for (const el of document.querySelectorAll(sel.join(','))) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.height > 0 && el.checkVisibility({opacityProperty: true, visibilityProperty: true})
        && el.innerText.trim()) out.push(el.innerText.trim().slice(0, 120));
  }
  return Array.from(new Set(out));
}
"""


@pytest.fixture
def wide_page(browser, app_server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pages = {}
    contexts = []
    for name, (w, h) in VIEWPORTS.items():
        context = browser.new_context(viewport={"width": w, "height": h})
        contexts.append(context)
        pg = context.new_page()
        pg.goto(app_server["url"])
        pg.wait_for_selector("#generate", timeout=60_000)
        pages[name] = pg
    yield pages
    for c in contexts:
        c.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def video_loaded(page) -> None:
    """The final MP4 is playing (its first frame is drawn) before an 'after' screenshot."""
    page.wait_for_function("() => { const v = document.querySelector('#video video'); return v && v.readyState >= 2; }",
                           timeout=30_000)


def test_one_progress_indicator_during_a_20_step_run_and_screenshots(wide_page):
    main, other = wide_page["1280x800"], wide_page["1920x1080"]
    for name, page in wide_page.items():
        pick(page, "model-picker", "demo-wan2.1-t2v-1.3b")
        wait_text(page, "#model-note", "1 expert")
        page.click("#add-lora")
        page.locator("#lora-row-0").wait_for(state="visible")
        pick(page, "lora-file-0", "style-peft")
        wait_text(page, "#lora-info-0", "keys match this model")
        page.fill("#prompt textarea", f"a lighthouse in a storm ({name})")
        page.fill("#steps input", "20")
        page.press("#steps input", "Tab")
        shot(page, f"run-{name}-1-before")
    assert main.evaluate(COUNT_PROGRESS_JS) == []  # idle: no progress shown at all

    main.click("#generate")
    other.click("#generate")  # queued behind the first: says how many jobs are ahead
    wait_text(other, "#run-status", "waiting: 1 ahead", timeout_s=30)
    # the status and the progress elements of one frame mid-run (a 20-step demo run takes about a second, so the
    # loop below may first look when it is already decoding)
    mid_run = main.wait_for_function(
        "() => { const t = document.querySelector('#run-status').innerText;"
        f" return /step ([2-9]|1[0-9])\\/20/.test(t) ? [t, ({COUNT_PROGRESS_JS})()] : false; }}",
        timeout=300_000).json_value()
    seen = [(mid_run[0][:40], mid_run[1])]
    assert len(mid_run[1]) <= 1, f"{len(mid_run[1])} progress indicators visible mid-run: {mid_run[1]}"
    deadline = time.monotonic() + 300
    shot_taken = False
    while time.monotonic() < deadline:
        text = main.inner_text("#run-status")
        found = main.evaluate(COUNT_PROGRESS_JS)
        seen.append((text[:40], found))
        assert len(found) <= 1, f"{len(found)} progress indicators visible mid-run: {found}"
        if not shot_taken and "step" in text:
            shot(main, "run-1280x800-2-during")
            shot(other, "run-1920x1080-2-waiting")
            shot_taken = True
        if "Done" in text:
            break
        main.wait_for_timeout(150)
    assert any("step" in t for t, _ in seen) and any(f for _, f in seen), seen  # we did look at a running bar
    wait_text(main, "#run-status", "Done", timeout_s=300)
    video_loaded(main)
    shot(main, "run-1280x800-3-after")
    # the queued run starts when the first ends: look at it mid-run at 1920x1080 too
    other.wait_for_function("() => /step ([2-9]|1[0-9])\\/20/.test(document.querySelector('#run-status').innerText)",
                            timeout=300_000)
    assert len(other.evaluate(COUNT_PROGRESS_JS)) <= 1
    shot(other, "run-1920x1080-2-during")
    wait_text(other, "#run-status", "Done", timeout_s=300)
    assert len(other.evaluate(COUNT_PROGRESS_JS)) <= 1
    video_loaded(other)
    shot(other, "run-1920x1080-3-after")
    assert "keys applied" in main.inner_text("#lora-info-0")  # the rows get their coverage after the run
    assert main.evaluate(COUNT_ERRORS_JS) == []


def test_a_failure_shows_exactly_one_error_message(page, app_server, browser):
    root = app_server["root"]
    # another tab left on its gallery: the runs below show up there without a click
    other_context = browser.new_context(viewport={"width": 1280, "height": 800})
    other = other_context.new_page()
    other.goto(app_server["url"])
    other.wait_for_selector("#history", timeout=60_000)
    pick(page, "model-picker", "demo-wan2.1-t2v-1.3b")
    wait_text(page, "#model-note", "1 expert")
    # refused at the door: an empty prompt
    page.fill("#prompt textarea", "")
    page.click("#generate")
    wait_text(page, "#run-error", "prompt is empty")
    errors = page.evaluate(COUNT_ERRORS_JS)
    assert len(errors) == 1 and "prompt is empty" in errors[0], errors
    shot(page, "run-1280x800-4-refused")

    # a LoRA that breaks after it was picked: the run fails, one message in one place
    src = next((root / "loras").rglob("style-peft.safetensors"))
    broken = root / "loras" / "e2e-breaks.safetensors"
    shutil.copyfile(src, broken)
    page.click("#refresh-loras")
    page.click("#add-lora")
    page.locator("#lora-row-0").wait_for(state="visible")
    pick(page, "lora-file-0", "e2e-breaks")
    broken.write_bytes(b"not a safetensors file at all" * 10)
    page.fill("#prompt textarea", "a cat")
    page.fill("#steps input", "3")
    page.press("#steps input", "Tab")
    page.click("#generate")
    wait_text(page, "#run-error", "cannot be read", timeout_s=300)  # this run's message, not the previous one
    page.wait_for_timeout(1000)  # anything else that would pop up has had its chance
    errors = page.evaluate(COUNT_ERRORS_JS)
    assert len(errors) == 1 and "e2e-breaks" in errors[0] and "cannot be read" in errors[0], errors
    assert "Done" not in page.inner_text("#run-status")
    shot(page, "run-1280x800-5-failed")
    page.click("#lora-remove-0")
    page.locator("#lora-row-0").wait_for(state="hidden")
    broken.unlink()

    # a failure inside the run (the model's weights are damaged: loading fails in the engine's worker)
    demo = next((root / "data" / "demo-models").glob("demo-wan2.1-t2v-1.3b"))
    damaged = root / "models" / "damaged-1.3b"
    shutil.copytree(demo, damaged)
    for weights in (damaged / "transformer").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:64])
    try:
        page.click("#rescan-models")
        pick(page, "model-picker", "damaged-1.3b")
        wait_text(page, "#model-note", "1 expert")
        page.fill("#prompt textarea", "a cat on damaged weights")
        page.click("#generate")
        wait_text(page, "#run-status", "Run failed", timeout_s=300)
        page.wait_for_timeout(1000)
        errors = page.evaluate(COUNT_ERRORS_JS)
        assert len(errors) == 1, errors
        # one line naming the file and the fix, not the loader's OSError
        message = page.inner_text("#run-error")
        file = damaged / "transformer" / "diffusion_pytorch_model.safetensors"
        assert f"{file} is truncated or not a safetensors file" in message and "download it again" in message
        assert "generation failed" not in message and "OSError" not in message
        shot(page, "run-1280x800-6-failed-mid-run")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "damaged-model-error-1280x800.png"))
        wait_text(other, "#history", "FAILED · a cat on damaged weights", timeout_s=30)
    finally:
        shutil.rmtree(damaged)
        page.click("#rescan-models")
    # the rescan moves the picker off the removed model: wait for it, or it may undo the pick below
    page.wait_for_function("() => !document.querySelector('#model-picker input').value.includes('damaged')",
                           timeout=60_000)

    # the next good run clears it
    pick(page, "model-picker", "demo-wan2.1-t2v-1.3b")
    wait_text(page, "#model-note", "1 expert")
    page.fill("#prompt textarea", "a cat after the damage")
    page.click("#generate")
    wait_text(page, "#run-status", "Done", timeout_s=300)
    assert page.evaluate(COUNT_ERRORS_JS) == []
    wait_text(other, "#history", "a cat after the damage", timeout_s=30)
    other.screenshot(path=str(SHOTS / "other-tab-gallery-1280x800.png"))
    other_context.close()
