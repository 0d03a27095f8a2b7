"""Hostile requests against a launched app, through gradio_client and raw HTTP: paths in every field,
files outside outputs/, oversized uploads and bodies, values outside the allowed ones, bad launch flags."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = "demo-wan2.1-t2v-1.3b"
GOOD_LORA = "demo/style-peft.safetensors"
PATHS = ["../../etc/passwd", "/etc/passwd", "demo/../../../etc/passwd", "..\\..\\etc\\passwd", "C:\\Windows\\win.ini",
         "demo/style-peft.safetensors\x00.txt", "ｄｅｍｏ/style-peft.safetensors", "demo/style‐peft.safetensors",
         "demo/style-peft.safetensors ", "~/.ssh/id_rsa", "file:///etc/passwd", "%2e%2e/%2e%2e/etc/passwd"]


@pytest.fixture(scope="module")
def client(hostile_app):
    from gradio_client import Client

    return Client(hostile_app["url"], verbose=False)


def gen(client, **over):
    args = dict(model=MODEL, prompt="a fox", negative_prompt="", image=None, stack="", width=64, height=64, frames=9,
                steps=1, seed=1)
    args.update(over)
    return client.predict(**args, api_name="/generate")


def refused(client, **over) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        gen(client, **over)
    text = str(info.value)
    assert "Traceback" not in text and len(text) < 2000, text
    return text


def alive(url: str) -> None:
    t0 = time.perf_counter()
    urllib.request.urlopen(url + "/gradio_api/info", timeout=10).read()
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("path", PATHS)
def test_paths_in_every_field_are_refused(client, hostile_app, path):
    assert "not found" in refused(client, model=path)
    text = refused(client, stack=json.dumps([{"file": path, "weight": 1}]))
    assert "unknown LoRA" in text or "not a file name" in text, text
    text = refused(client, stack=path)  # a preset name
    assert "neither JSON nor a saved preset" in text or "preset" in text
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="not found"):
        client.predict(model=path, api_name="/loras")
    alive(hostile_app["url"])


def test_an_image_path_outside_the_upload_folder_is_refused(hostile_app):
    """A raw API call naming a server file as the start image never reads it."""
    status, body = call(hostile_app["url"], "generate",
                        [MODEL, "x", "", {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "", 64, 64, 9,
                         1, 1])
    assert "root:" not in body
    assert status >= 400 or "error" in body.lower(), body[:500]


def test_values_outside_the_allowed_ones(client, hostile_app):
    cases = {
        "width": (dict(width=-64), "width"), "height": (dict(height=10**9), "height"),
        "frames": (dict(frames=10), "4k+1"), "steps": (dict(steps=10**6), "steps"),
        "prompt": (dict(prompt="p" * 20_000), "at most 10000"), "empty": (dict(prompt="  "), "prompt is empty"),
        "enabled": (dict(stack=json.dumps([{"file": GOOD_LORA, "enabled": "no"}])), "true or false"),
        "weight": (dict(stack=json.dumps([{"file": GOOD_LORA, "weight": None}])), "must be a number"),
        "applies": (dict(stack=json.dumps([{"file": GOOD_LORA, "applies_to": "everything"}])), "applies_to"),
        "nested": (dict(stack="[" * 30_000 + "]" * 30_000), "nested too deeply"),
        "deep-long": (dict(stack="[" * 100_000 + "]" * 100_000), "at most 65536"),
        "stack-size": (dict(stack=json.dumps([{"file": GOOD_LORA}] * 200)), "at most 64"),
        "nul-file": (dict(stack=json.dumps([{"file": "a\x00b"}])), "NUL"),
        "long-file": (dict(stack=json.dumps([{"file": "a" * 5000}])), "1024"),
    }
    for name, (over, expected) in cases.items():
        text = refused(client, **over)
        assert expected in text, (name, text)
    alive(hostile_app["url"])


def call(url: str, api: str, data: list, timeout: float = 120) -> tuple[int, str]:
    """POST /gradio_api/call/<api> and read its event stream; (status, text)."""
    req = urllib.request.Request(f"{url}/gradio_api/call/{api}", data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            event = json.loads(r.read())["event_id"]
        with urllib.request.urlopen(f"{url}/gradio_api/call/{api}/{event}", timeout=timeout) as r:
            return 200, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def raw_post(url: str, path: str, body: bytes, content_type: str = "application/json", chunked: bool = False):
    import http.client

    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        if chunked:
            conn.putrequest("POST", path)
            conn.putheader("Content-Type", content_type)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            step = 256 * 1024
            try:
                for i in range(0, len(body), step):
                    part = body[i:i + step]
                    conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                conn.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:  # the server may answer 413 and close before the body is sent: that is the point
            conn.putrequest("POST", path)
            conn.putheader("Content-Type", content_type)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            try:
                conn.send(body)
            except (BrokenPipeError, ConnectionResetError):
                pass
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def test_oversized_bodies_and_data_images_are_refused(hostile_app):
    url = hostile_app["url"]
    big_json = json.dumps({"data": [MODEL, "x" * (3 << 20), "", None, "", 64, 64, 9, 1, 1]}).encode()
    for chunked in (False, True):
        status, text = raw_post(url, "/gradio_api/call/generate", big_json, chunked=chunked)
        assert status == 413 and "--max-upload" in text, (chunked, status, text[:300])
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + os.urandom(2 << 20)).decode()
    data_image = {"url": f"data:image/png;base64,{png}", "meta": {"_type": "gradio.FileData"}}
    status, text = raw_post(url, "/gradio_api/call/generate",
                            json.dumps({"data": [MODEL, "x", "", data_image, "", 64, 64, 9, 1, 1]}).encode())
    assert status == 413, (status, text[:300])
    boundary = "wanstackboundary"
    upload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
              f"Content-Type: image/png\r\n\r\n").encode() + os.urandom(3 << 20) + f"\r\n--{boundary}--\r\n".encode()
    status, text = raw_post(url, "/gradio_api/upload", upload, f"multipart/form-data; boundary={boundary}")
    assert status in (413, 400), (status, text[:300])
    alive(url)


def test_only_outputs_are_served_whatever_the_spelling(client, hostile_app):
    url, root = hostile_app["url"], hostile_app["root"]
    path, _ = gen(client)
    output = Path(path)
    outputs = root / "outputs"
    mp4 = next(outputs.glob("*.mp4"))
    lora = next((root / "loras").rglob("*.safetensors"))
    preset = next((root / "presets").glob("*.json"))
    (outputs / "link-to-lora.safetensors").symlink_to(lora)

    def status(target: str) -> int:
        try:
            return urllib.request.urlopen(f"{url}/gradio_api/file={target}", timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code

    assert output.name.endswith(".mp4") and status(str(mp4)) == 200
    bad = [str(lora), str(preset), "/etc/passwd", str(root / "app.log"), f"{outputs}/../app.log",
           f"{outputs}/%2e%2e/app.log", f"{outputs}/..%2fapp.log", str(outputs / "link-to-lora.safetensors"),
           str(root / "data"), "/proc/self/environ", f"{outputs}/../loras/{lora.relative_to(root / 'loras')}"]
    codes = {b: status(b) for b in bad}
    assert all(c in (403, 404, 400) for c in codes.values()), codes


def test_bad_launch_flags_get_one_line_fast(tmp_path):
    cases = [(["--share"], "--auth"), (["--share", "--auth", "nopass"], "USER:PASS"),
             (["--max-upload", "junk"], "not a size"), (["--queue-size", "0"], "between 1 and 1000"),
             (["--server-port", "70000"], "between 1 and 65535")]
    for args, expected in cases:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, str(ROOT / "app.py"), *args, "--models-dir", str(tmp_path / "m")],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (args, out.stderr[-500:])
        assert expected in out.stderr and "Traceback" not in out.stderr, (args, out.stderr[-500:])
        assert time.perf_counter() - t0 < 20


def test_every_dropdown_refuses_values_outside_its_choices(tmp_path):
    """A hostile client can call the page's own events with any value: no dropdown takes a custom value, so
    Gradio refuses one outside the choices before our handler runs (names from the public API are checked
    against the server's own lists, tested above)."""
    import gradio as gr

    sys.path.insert(0, str(ROOT / "tests" / "ui"))
    from fake_engine import FakeEngine

    from ui import build_ui

    demo = build_ui(FakeEngine(tmp_path))
    dropdowns = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown)]
    assert len(dropdowns) >= 6
    for dd in dropdowns:
        assert not dd.allow_custom_value, dd.elem_id
        for value in ("../../etc/passwd", "/etc/passwd", "x\x00y"):
            with pytest.raises(gr.Error, match="not in the list of choices"):
                dd.preprocess(value)
