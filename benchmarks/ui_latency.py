"""UI latency on this machine, measured in headless Chromium against a launched `python app.py`:
cold start to an interactive page, stack-edit round trips, step time, first preview, first streamed
video bytes against the end of decoding.

    python benchmarks/ui_latency.py [--json] [--steps 8] [--frames 33] [--edits 10]

Targets (issue 5): start < 10 s, stack edits < 100 ms, first preview <= one step + 0.5 s.
The demo model is built once beforehand (not counted); times are wall-clock on the demo model.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MODEL = "demo-wan2.1-t2v-1.3b"

# Timestamps (performance.now) of preview changes, streamed-video segments and the final video.
WATCH_JS = """
() => {
  const srcOf = (sel) => { const e = document.querySelector(sel); return e ? e.getAttribute('src') : null; };
  const old = {preview: srcOf('#preview img'), video: srcOf('#video video')};
  const s = window.__bench = {previews: [], final_at: null, decoding_at: null, started: false, done: false,
                              statuses: []};
  window.__benchTimer = setInterval(() => {
    const text = document.querySelector('#run-status').innerText;
    if (!s.started) { s.started = !text.includes('Done'); return; }
    const src = srcOf('#preview img');
    if (src && src !== old.preview && (s.previews.length === 0 || s.previews[s.previews.length - 1].src !== src))
      s.previews.push({src, t: performance.now()});
    if (s.decoding_at === null && text.includes('decoding')) s.decoding_at = performance.now();
    const last = s.statuses[s.statuses.length - 1];
    if (!last || last.text !== text.slice(0, 80)) s.statuses.push({text: text.slice(0, 80), t: performance.now()});
    const v = srcOf('#video video');
    if (s.final_at === null && v && v !== old.video) s.final_at = performance.now();
    s.done = text.includes('Done');
  }, 5);
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_command(root: Path, port: int) -> list[str]:
    return [sys.executable, str(ROOT / "app.py"), "--server-port", str(port), "--models-dir", str(root / "models"),
            "--loras-dir", str(root / "loras"), "--presets-dir", str(root / "presets"),
            "--outputs-dir", str(root / "outputs"), "--data-dir", str(root / "data")]


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("app exited during start")
        try:
            urllib.request.urlopen(url + "/gradio_api/info", timeout=2)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("app did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def pick(page, elem_id: str, text: str) -> None:
    page.click(f"#{elem_id} input")
    page.locator("ul[role=listbox] li", has_text=text).first.click()


def measure(args) -> dict:
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="wanstack-bench-"))
    shutil.copytree(ROOT / "presets", root / "presets")
    # first run: builds the demo models and LoRAs (reported, not part of cold start)
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(app_command(root, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}", proc)
    first_run_s = time.perf_counter() - t0
    stop(proc)

    out: dict = {"first_run_with_demo_build_s": round(first_run_s, 2)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        port = free_port()
        t0 = time.perf_counter()
        proc = subprocess.Popen(app_command(root, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url, proc)
            out["server_up_s"] = round(time.perf_counter() - t0, 2)
            page.goto(url)
            # interactive = the controls we use exist and the stack editor shows the model's cap
            page.wait_for_function(
                "() => document.querySelector('#add-lora') && document.querySelector('#generate') && "
                "(document.querySelector('#cap-indicator') || {}).innerText?.includes('on model')", timeout=120_000)
            out["cold_start_s"] = round(time.perf_counter() - t0, 2)
            out.update(edits(page, args.edits))
            out.update(generation(page, args))
        finally:
            browser.close()
            stop(proc)
    shutil.rmtree(root, ignore_errors=True)
    return out


# Clicks inside the page and waits for the DOM change with requestAnimationFrame, so the figure is the
# server round trip plus Gradio's re-render, without the driver's own per-action overhead.
ADD_ROW_JS = """
async () => {
  const shown = () => { const r = document.querySelector('#lora-row-0'); return r && r.offsetParent !== null; };
  const t = performance.now();
  document.querySelector('#add-lora').click();
  await new Promise(res => { const f = () => shown() ? res() : requestAnimationFrame(f); f(); });
  return performance.now() - t;
}
"""
SLIDER_JS = """
async (value) => {
  const range = document.querySelector('#lora-slider-0 input[type=range]');
  const box = document.querySelector('#lora-weight-0 input');
  const t = performance.now();
  range.value = value;
  range.dispatchEvent(new Event('input', {bubbles: true}));
  range.dispatchEvent(new Event('change', {bubbles: true}));
  await new Promise(res => { const f = () => box.value === value ? res() : requestAnimationFrame(f); f(); });
  return performance.now() - t;
}
"""


def edits(page, n: int) -> dict:
    """Round trips seen in the page: '+ Add LoRA' until the row shows; a slider move until the
    typed-weight box (set by the server) follows."""
    add_ms, slider_ms = [], []
    for _ in range(n):
        add_ms.append(page.evaluate(ADD_ROW_JS))
        page.click("#lora-remove-0")
        page.locator("#lora-row-0").wait_for(state="hidden")
    page.click("#add-lora")
    page.locator("#lora-row-0").wait_for(state="visible")
    for i in range(n):
        slider_ms.append(page.evaluate(SLIDER_JS, f"{-1.5 + 0.25 * (i % 12):g}"))
    page.click("#lora-remove-0")
    add, slider = statistics.median(add_ms), statistics.median(slider_ms)
    return {"stack_edit_ms": round(max(add, slider), 1), "add_row_ms": round(add, 1), "slider_ms": round(slider, 1)}


STREAMS_SEEN: set[str] = set()


def run_once(page, steps: int, frames: int, args_debug: bool = False) -> dict:
    page.fill("#steps input", str(steps))
    page.press("#steps input", "Tab")
    page.locator("#frames input[type=range]").fill(str(frames))
    page.wait_for_timeout(300)
    segments: list[float] = []
    old_streams = set(STREAMS_SEEN)

    def on_response(response):
        # a segment of this run's stream (the player may still poll an earlier run's playlist)
        stream_dir = response.url.rsplit("/", 1)[0]
        if "/stream/" in response.url and response.url.endswith(".ts") and stream_dir not in old_streams:
            segments.append(time.perf_counter())

    page.on("response", on_response)
    page.evaluate(WATCH_JS)
    start_ms = page.evaluate("performance.now()")
    t_click = time.perf_counter()
    page.click("#generate")
    page.wait_for_function("() => window.__bench.done", timeout=600_000)
    page.wait_for_timeout(200)
    seen = page.evaluate("window.__bench")
    page.evaluate("clearInterval(window.__benchTimer)")
    page.remove_listener("response", on_response)
    previews = [(p["t"] - start_ms) / 1000 for p in seen["previews"]]
    status = page.inner_text("#run-status")
    return {
        "previews": previews,
        "decoding_at": (seen["decoding_at"] - start_ms) / 1000 if seen["decoding_at"] else None,
        "final_at": (seen["final_at"] - start_ms) / 1000 if seen["final_at"] else None,
        "first_segment": (min(segments) - t_click) if segments else None,
        "status": status,
        "statuses": [(round((x["t"] - start_ms) / 1000, 3), x["text"]) for x in seen["statuses"]],
    }


def generation(page, args) -> dict:
    page.on("response", lambda r: STREAMS_SEEN.add(r.url.rsplit("/", 1)[0]) if "/stream/" in r.url else None)
    pick(page, "preset-picker", "Demo style + detail")
    page.click("#preset-load")
    page.wait_for_function("() => document.querySelector('#preset-status').innerText.includes('loaded')")
    page.fill("#prompt textarea", "a fox running through snow")
    page.check("#stream-toggle input")  # off by default on demo models; measured both ways
    run_once(page, 2, 9)  # warm: loads the pipeline and applies the stack once
    r = run_once(page, args.steps, args.frames, args.debug)
    page.uncheck("#stream-toggle input")
    plain = run_once(page, args.steps, args.frames, args.debug)
    page.check("#stream-toggle input")
    if args.debug:
        print(json.dumps(r["statuses"]), file=sys.stderr)
    # the engine's own per-step seconds, from the status line ("step 3/8 · 0.12 s/step · ..."); step 1
    # also carries the text encoding, so it is left out
    reported = {}
    for _, text in r["statuses"]:
        m = re.search(r"step (\d+)/\d+ · ([\d.]+) s/step", text)
        if m and int(m.group(1)) > 1:
            reported[int(m.group(1))] = float(m.group(2))
    step_s = statistics.median(reported.values()) if reported else None
    denoise_at = next((t for t, text in r["statuses"] if text.startswith("denoising")), None)
    return {
        "step_s": round(step_s, 3) if step_s else None,
        "first_preview_s": round(r["previews"][0], 3) if r["previews"] else None,
        "first_preview_after_denoise_start_s": round(r["previews"][0] - denoise_at, 3)
        if r["previews"] and denoise_at is not None else None,
        "preview_updates": len(r["previews"]),
        "decode_start_s": round(r["decoding_at"], 3) if r["decoding_at"] else None,
        "first_video_bytes_s": round(r["first_segment"], 3) if r["first_segment"] else None,
        "decode_end_s": round(r["final_at"], 3) if r["final_at"] else None,
        "no_stream_decode_start_s": round(plain["decoding_at"], 3) if plain["decoding_at"] else None,
        "no_stream_decode_end_s": round(plain["final_at"], 3) if plain["final_at"] else None,
        "steps": args.steps, "frames": args.frames,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--edits", type=int, default=10, help="repetitions per edit kind")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--debug", action="store_true", help="log the page's network responses during the measured run")
    args = p.parse_args()
    result = measure(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(json.dumps(result))
    targets = {"cold_start_s": ("< 10 s", lambda v: v < 10), "stack_edit_ms": ("< 100 ms", lambda v: v < 100)}
    if result.get("step_s") is not None:
        limit = result["step_s"] + 0.5
        targets["first_preview_s"] = (f"<= step + 0.5 s = {limit:.2f}", lambda v: v <= limit)
    print(f"{'measure':<38}{'value':>10}  target")
    for key, value in result.items():
        target, ok = targets.get(key, ("", None))
        mark = "" if ok is None or value is None else ("  ok" if ok(value) else "  MISSED")
        print(f"{key:<38}{str(value):>10}  {target}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
