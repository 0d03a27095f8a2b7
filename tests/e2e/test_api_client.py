"""The named API from gradio_client: /generate with a stack gives a playable MP4; bad stacks get clear errors;
/models, /loras and /presets list what the server has."""
from __future__ import annotations

import json
import re

import pytest

from engine.run.video import probe_video

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MODEL = "demo-wan2.1-t2v-1.3b"


@pytest.fixture(scope="module")
def client(app_server):
    from gradio_client import Client

    return Client(app_server["url"], verbose=False)


def generate(client, stack: str, steps: int = 2):
    return client.predict(model=MODEL, prompt="a fox", negative_prompt="", image=None, stack=stack, width=64,
                          height=64, frames=9, steps=steps, seed=7, api_name="/generate")


def test_generate_with_stack_gives_playable_mp4(client):
    stack = json.dumps([{"file": "demo/style-peft.safetensors", "weight": 0.8},
                        {"file": "demo/motion-comfy.safetensors", "weight": -1.5}])
    path, summary_text = generate(client, stack)
    summary = json.loads(summary_text)
    probe = probe_video(path)  # imageio-ffmpeg's own ffmpeg: no system tool needed
    assert (probe.codec, probe.width, probe.height, probe.frames) == ("h264", 64, 64, 9)
    assert summary["seed"] == 7 and summary["frames"] == 9 and summary["path"].endswith(".mp4")
    assert [r["file"] for r in summary["loras"]] == ["demo/style-peft.safetensors", "demo/motion-comfy.safetensors"]
    assert all(r["status"] == "applied" for r in summary["loras"])


def test_generate_with_preset_name(client):
    summary = json.loads(generate(client, "Demo style + detail", steps=1)[1])
    assert [r["file"] for r in summary["loras"]] == ["demo/style-peft.safetensors", "demo/detail-kohya.safetensors"]


@pytest.mark.parametrize("stack, message", [
    ('[{"file": "nope.safetensors", "weight": 1}]', "unknown LoRA 'nope.safetensors'"),
    ('[{"file": "../../etc/passwd", "weight": 1}]', "unknown LoRA '../../etc/passwd'"),
    ("../../etc/passwd", "neither JSON nor a saved preset"),
    (json.dumps([{"file": f, "weight": 1} for f in ("demo/style-peft.safetensors", "demo/motion-comfy.safetensors",
                                                    "demo/detail-kohya.safetensors")]), "LoRA cap reached"),
    ('[{"file": "demo/speed_high_noise.safetensors", "weight": 1}]', "does not fit"),
    ('[{"file": "demo/style-peft.safetensors", "weight": 11}]', "between -10 and 10"),
    ("[{not json", "not valid JSON"),
])
def test_bad_stacks_get_clear_errors(client, stack, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        generate(client, stack, steps=1)
    assert message in str(info.value)


def test_unknown_model_is_refused(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="not found; available"):
        client.predict(model="/etc", prompt="x", negative_prompt="", image=None, stack="", width=64, height=64,
                       frames=9, steps=1, seed=1, api_name="/generate")


def test_listing_endpoints(client):
    models = client.predict(api_name="/models")
    assert {m["id"] for m in models} >= {MODEL, "demo-wan2.2-t2v-a14b"}
    assert all(m["demo"] for m in models)
    a14b = next(m for m in models if m["id"] == "demo-wan2.2-t2v-a14b")
    assert a14b["source"] == "diffusers" and a14b["storage"] in ("fp32", "bf16")
    assert a14b["files"]["transformer_2"] == "transformer_2" and a14b["files"]["vae"] == "vae"
    loras = client.predict(model=MODEL, api_name="/loras")
    by_file = {d["file"]: d for d in loras}
    assert by_file["demo/style-peft.safetensors"]["compatible"] is True
    assert by_file["demo/speed_high_noise.safetensors"]["compatible"] is False
    presets = client.predict(api_name="/presets")
    assert "Demo speed pair A14B" in {p["name"] for p in presets}


def test_only_named_endpoints_are_public(client):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert names == {"/generate", "/models", "/loras", "/presets"}


def test_queue_is_bounded_and_says_so(client):
    """One GPU job at a time; with --queue-size 4, extra submissions are refused with 'Queue is full'."""
    jobs = [client.submit(model=MODEL, prompt="q", negative_prompt="", image=None, stack="", width=64, height=64,
                          frames=9, steps=3, seed=i, api_name="/generate") for i in range(8)]
    errors, done = [], 0
    for job in jobs:
        try:
            job.result(timeout=300)
            done += 1
        except Exception as e:  # noqa: BLE001 - the client raises its own types; the message is what we check
            errors.append(str(e))
    assert done >= 1
    assert errors and all("Queue is full" in e or "queue is full" in e.lower() for e in errors), errors


def test_uploads_over_the_limit_are_refused(client, tmp_path):
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (21 * 1024 * 1024))  # over the default --max-upload 20mb
    # the limit is in the app config, so the client refuses before sending; the server enforces it too
    with pytest.raises(Exception) as info:  # noqa: PT011 - the client raises a plain ValueError
        client.predict(model=MODEL, prompt="x", negative_prompt="", image=handle_file(str(big)), stack="", width=64,
                       height=64, frames=9, steps=1, seed=1, api_name="/generate")
    assert re.search(r"(?i)exceeds the maximum|too large|413", str(info.value)), info.value


def test_only_outputs_are_served(app_server, client):
    import urllib.error
    import urllib.request

    root = app_server["root"]
    generate(client, "", steps=1)
    output = next((root / "outputs").glob("*.mp4"))
    lora = next((root / "loras").rglob("*.safetensors"))
    model_index = next((root / "data").rglob("model_index.json"))
    preset = next((root / "presets").glob("*.json"))

    def status(path):
        try:
            return urllib.request.urlopen(f"{app_server['url']}/gradio_api/file={path}", timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code

    assert status(output) == 200
    assert [status(p) for p in (lora, model_index, preset, "/etc/passwd")] == [403, 403, 403, 403]
