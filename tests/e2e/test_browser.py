"""The app in headless Chromium: pick a model, build a stack to the cap, save/reload/load a preset,
generate with live previews into a playing MP4, and stop a run midway."""
from __future__ import annotations

import json
import time

from pathlib import Path

import pytest

from engine.run.video import probe_video

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "e2e"

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# Records every distinct preview image and the first time the final video gets a source.
WATCH_JS = """
() => {
  window.__seen = {previews: [], video_at: null, started: performance.now()};
  window.__watch = setInterval(() => {
    const img = document.querySelector('#preview img');
    const src = img && img.getAttribute('src');
    const p = window.__seen.previews;
    if (src && (p.length === 0 || p[p.length - 1].src !== src)) p.push({src, t: performance.now()});
    const v = document.querySelector('#video video');
    if (v && v.getAttribute('src') && window.__seen.video_at === null) window.__seen.video_at = performance.now();
  }, 25);
}
"""


def pick(page, elem_id: str, text: str, attempts: int = 3) -> None:
    """Choose a dropdown option; re-opens the list if its choices were still being refreshed."""
    for attempt in range(attempts):
        page.click(f"#{elem_id} input")
        option = page.locator("ul[role=listbox] li", has_text=text).first
        try:
            option.wait_for(timeout=5_000)
        except Exception:  # noqa: BLE001 - playwright's TimeoutError; retried, then re-raised below
            page.keyboard.press("Escape")
            if attempt == attempts - 1:
                raise
            continue
        option.click()
        page.wait_for_timeout(300)
        return


def wait_text(page, selector: str, text: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        content = page.inner_text(selector)
        if text in content:
            return content
        page.wait_for_timeout(100)
    raise AssertionError(f"{selector} never showed {text!r}; last: {page.inner_text(selector)!r}")


def wait_value(page, selector: str, value: str, timeout_s: float = 15) -> None:
    """An input's value after a server round trip (which can take a while on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while page.input_value(selector) != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{selector} is {page.input_value(selector)!r}, expected {value!r}")
        page.wait_for_timeout(50)


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def test_stack_preset_generate_stop(page, app_server):
    pick(page, "model-picker", "demo-wan2.2-t2v-a14b")
    wait_text(page, "#model-note", "2 experts")
    pick(page, "model-picker", "demo-wan2.1-t2v-1.3b")
    wait_text(page, "#model-note", "1 expert")
    wait_text(page, "#model-note", "random weights")
    wait_text(page, "#cap-indicator", "0/2 on model")

    # two LoRAs, weights set by typing (beyond the slider) and by the slider
    page.click("#add-lora")
    page.locator("#lora-row-0").wait_for(state="visible")
    pick(page, "lora-file-0", "style-peft")
    page.click("#add-lora")
    page.locator("#lora-row-1").wait_for(state="visible")
    pick(page, "lora-file-1", "detail-kohya")
    wait_text(page, "#cap-indicator", "2/2 on model")
    page.fill("#lora-weight-0 input", "3.5")
    page.press("#lora-weight-0 input", "Tab")
    page.locator("#lora-slider-1 input[type=range]").fill("-0.5")
    wait_value(page, "#lora-weight-1 input", "-0.5")
    wait_value(page, "#lora-slider-0 input[type=range]", "2")  # typed 3.5, slider pinned at its end
    wait_text(page, "#lora-info-0", "keys match this model")

    # a third enabled LoRA would pass the cap: refused with the reason and the flag to raise it
    page.click("#add-lora")
    message = wait_text(page, "#stack-message", "LoRA cap reached")
    assert "--lora-cap demo-wan2.1-t2v-1.3b=3" in message
    assert not page.locator("#lora-row-2").is_visible()
    shot(page, "1-stack-at-cap")

    # save, reload the page, load the preset back
    page.fill("#preset-name :is(input, textarea)", "E2E stack")
    page.click("#preset-save")
    wait_text(page, "#preset-status", "saved")
    page.reload()
    page.wait_for_selector("#generate")
    assert not page.locator("#lora-row-0").is_visible()
    pick(page, "preset-picker", "E2E stack")
    page.click("#preset-load")
    wait_text(page, "#preset-status", "loaded")
    wait_value(page, "#lora-weight-0 input", "3.5")
    wait_value(page, "#lora-weight-1 input", "-0.5")
    assert "detail-kohya" in page.input_value("#lora-file-1 input")
    shot(page, "2-preset-loaded")

    # export downloads the preset's JSON; duplicate and delete manage the folder
    page.click("#preset-more")
    with page.expect_download() as download:
        page.click("#preset-export")
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["name"] == "E2E stack" and [e["weight"] for e in exported["entries"]] == [3.5, -0.5]
    assert all(e.get("sha256") for e in exported["entries"])  # saved with hashes, so changes can be spotted
    page.fill("#preset-name :is(input, textarea)", "")
    page.click("#preset-duplicate")
    wait_text(page, "#preset-status", "duplicated as E2E stack copy")
    assert (app_server["root"] / "presets" / "e2e-stack-copy.json").exists()
    page.click("#preset-delete")  # asks first
    wait_text(page, "#preset-confirm-text", "cannot be undone")
    assert (app_server["root"] / "presets" / "e2e-stack-copy.json").exists()
    page.click("#preset-confirm-delete")
    wait_text(page, "#preset-status", "deleted")
    assert not (app_server["root"] / "presets" / "e2e-stack-copy.json").exists()
    pick(page, "preset-picker", "E2E stack")

    # generate: previews every step before the video, stack report, playable MP4 of the right length
    page.fill("#prompt textarea", "a fox in the snow")
    page.fill("#steps input", "10")
    page.press("#steps input", "Tab")
    page.evaluate(WATCH_JS)
    page.click("#generate")
    wait_text(page, "#run-status", "Done", timeout_s=120)
    page.wait_for_timeout(500)
    seen = page.evaluate("window.__seen")
    shot(page, "3-generated")
    before_video = [p for p in seen["previews"] if seen["video_at"] is None or p["t"] <= seen["video_at"]]
    assert len(before_video) >= 2, seen
    page.get_by_role("tab", name="Stack & memory").click()  # the report is one tab away from the gallery
    assert "keys applied" in wait_text(page, "#stack-report", "keys applied")
    page.get_by_role("tab", name="Gallery").click()
    assert "keys applied" in page.inner_text("#lora-info-0")  # coverage after apply, on the row
    duration = page.evaluate("""async () => {
        const v = document.querySelector('#video video');
        if (v.readyState < 1) await new Promise(r => v.addEventListener('loadedmetadata', r, {once: true}));
        v.muted = true; await v.play(); const t0 = v.currentTime;
        await new Promise(r => setTimeout(r, 400));
        return {duration: v.duration, advanced: v.currentTime !== t0 || v.ended, w: v.videoWidth};
    }""")
    assert abs(duration["duration"] - 9 / 8) < 0.2, duration
    assert duration["advanced"] and duration["w"] == 64
    src = page.get_attribute("#video video", "src")
    body = page.request.get(src).body()
    assert body[4:8] == b"ftyp"
    mp4 = ARTIFACTS / "generated.mp4"
    mp4.write_bytes(body)
    probe = probe_video(mp4)  # imageio-ffmpeg's own ffmpeg: no system tool needed
    assert probe.codec == "h264" and probe.frames == 9

    # stop mid-run: the app says where it stopped and is ready again
    page.fill("#steps input", "60")
    page.press("#steps input", "Tab")
    page.click("#generate")
    # steps are ~0.1 s on the demo: wait for "any step past the first", not for one exact text
    page.wait_for_function("() => /step ([2-9]|[1-9][0-9])\\/60/.test(document.querySelector('#run-status').innerText)",
                           timeout=60_000)
    page.click("#stop")
    status = wait_text(page, "#run-status", "Stopped", timeout_s=30)
    assert "of 60" in status
    shot(page, "4-stopped")
    page.fill("#steps input", "2")
    page.press("#steps input", "Tab")
    page.click("#generate")
    wait_text(page, "#run-status", "Done", timeout_s=300)
    # the gallery lists the outputs folder: both videos and the stopped run
    page.wait_for_function("() => document.querySelectorAll('#history button.thumbnail-item').length >= 3")
    assert "stopped" in page.inner_text("#history").lower()


def test_two_expert_pair_triggers_lset_import_and_reuse(page, app_server, tmp_path):
    pick(page, "model-picker", "demo-wan2.2-t2v-a14b")
    wait_text(page, "#cap-indicator", "0/3 on high-noise expert · 0/3 on low-noise expert")
    assert page.locator("#guidance-2").is_visible()

    # picking a '...high...' file offers its '...low...' partner as a pair on the other expert
    page.click("#add-lora")
    page.locator("#lora-row-0").wait_for(state="visible")
    assert page.locator("#lora-applies-0").is_visible()  # applies_to shows on two-expert models
    pick(page, "lora-file-0", "speed_high_noise")
    wait_text(page, "#add-pair", "speed_low_noise")
    page.click("#add-pair")
    page.locator("#lora-row-1").wait_for(state="visible")
    assert "speed_low_noise" in page.input_value("#lora-file-1 input")
    assert page.input_value("#lora-applies-1 input") == "acts on low-noise only"
    assert page.input_value("#lora-applies-0 input") == "acts on high-noise only"
    wait_text(page, "#cap-indicator", "1/3 on high-noise expert · 1/3 on low-noise expert")

    # trigger words go into the prompt
    page.click("#add-lora")
    page.locator("#lora-row-2").wait_for(state="visible")
    pick(page, "lora-file-2", "anime-a14b")
    page.locator("#lora-triggers-2").wait_for(state="visible")
    page.fill("#prompt textarea", "a cat")
    page.click("#lora-triggers-2")
    page.wait_for_function("() => document.querySelector('#prompt textarea').value.includes('anime style')")
    shot(page, "5-a14b-pair")

    # a Wan2GP .lset file imports into a stack (phase multipliers -> experts)
    lset = tmp_path / "Lightning pair.lset"
    lset.write_text(json.dumps({"loras": ["speed_high_noise.safetensors", "speed_low_noise.safetensors"],
                                "loras_mult": "1;0 0;0.8"}))
    page.click("#preset-more")
    with page.expect_file_chooser() as chooser:
        page.click("#preset-import")
    chooser.value.set_files(str(lset))
    wait_text(page, "#preset-status", "imported")
    assert page.locator("#lora-row-1").is_visible() and not page.locator("#lora-row-2").is_visible()
    assert page.input_value("#lora-file-0 input") == "demo/speed_high_noise.safetensors"
    assert page.input_value("#lora-weight-1 input") == "0.8"
    assert page.input_value("#lora-applies-1 input") == "acts on low-noise only"

    # generate, change things, then "Reuse these settings" restores prompt, seed and stack
    page.fill("#prompt textarea", "reuse me")
    page.fill("#seed input", "1234")
    page.press("#seed input", "Tab")
    page.fill("#steps input", "2")
    page.press("#steps input", "Tab")
    page.click("#generate")
    wait_text(page, "#run-status", "Done", timeout_s=120)
    page.fill("#prompt textarea", "something else")
    page.click("#lora-remove-0")
    page.locator("#lora-row-1").wait_for(state="hidden")
    page.locator("#history button.thumbnail-item").first.click()
    page.wait_for_timeout(300)
    page.click("#reuse")
    page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'reuse me'")
    page.locator("#lora-row-1").wait_for(state="visible")
    assert page.input_value("#seed input") == "1234"
    assert page.input_value("#lora-file-0 input") == "demo/speed_high_noise.safetensors"
    shot(page, "6-reused")


def test_preset_with_missing_and_changed_files_is_marked_not_dropped(page, app_server):
    preset = {"schema": 1, "name": "Stale stack", "model_type": "demo-wan2.1-t2v-1.3b", "notes": "",
              "created": "", "updated": "",
              "entries": [{"file": "demo/style-peft.safetensors", "weight": 0.7, "sha256": "0" * 64},
                          {"file": "demo/gone.safetensors", "weight": 1.0}]}
    (app_server["root"] / "presets" / "stale-stack.json").write_text(json.dumps(preset))
    page.reload()
    page.wait_for_selector("#generate")
    pick(page, "model-picker", "demo-wan2.1-t2v-1.3b")
    pick(page, "preset-picker", "Stale stack")
    page.click("#preset-load")
    wait_text(page, "#preset-status", "loaded")
    assert "changed" in page.inner_text("#lora-info-0")
    assert "missing" in page.inner_text("#lora-info-1")
    assert page.input_value("#lora-file-1 input") == "demo/gone.safetensors"
    page.fill("#prompt textarea", "x")
    page.click("#generate")
    error = wait_text(page, "#run-error", "not in the LoRA folder")
    assert "'demo/gone.safetensors' (row 2)" in error
    shot(page, "7-stale-preset")


def test_tools_tab_merges_the_stack_and_inspects_a_lora(page, app_server):
    import json

    pick(page, "model-picker", "demo-wan2.1-t2v-1.3b")
    wait_text(page, "#model-note", "1 expert")
    page.click("#add-lora")
    page.locator("#lora-row-0").wait_for(state="visible")
    file0 = "demo/style-peft.safetensors"
    pick(page, "lora-file-0", file0)
    wait_text(page, "#lora-info-0", "keys match this model")
    page.get_by_role("tab", name="Tools").click()
    what = wait_text(page, "#merge-what", "Will merge into a copy of demo-wan2.1-t2v-1.3b")  # says what it merges
    assert file0 in what
    page.fill("#merge-name input, #merge-name textarea", "merged-by-e2e")
    page.click("#merge-run")
    wait_text(page, "#merge-status", "wrote", timeout_s=120)
    out = app_server["root"] / "models" / "merged-by-e2e"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert "merged-by-e2e" in page.inner_text("#merge-report")
    page.click("#merge-run")  # the same name again is refused, and the merged model is left alone
    wait_text(page, "#merge-status", "⚠")
    assert (out / "model_index.json").exists()

    pick(page, "inspect-file", file0)
    pick(page, "inspect-model", "demo-wan2.1-t2v-1.3b")
    page.click("#inspect-run")
    table = wait_text(page, "#inspect-table", "keys match")
    assert "demo Wan 1.3B" in table and "rank" in table
    shot(page, "8-tools-tab")
    pick(page, "inspect-model", "demo-wan2.2-t2v-a14b")
    page.click("#inspect-run")
    wait_text(page, "#inspect-table", "made for demo Wan 1.3B")
