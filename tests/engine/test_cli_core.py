"""The `demo`, `models` and `generate` command-line contracts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_demo_models_generate_round_trip(tmp_path):
    out = run("demo", "--out", str(tmp_path / "models" / "m"), "--arch", "wan2.2-t2v-a14b", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["type"] == "demo-wan2.2-t2v-a14b"
    listed = json.loads(run("models", "--models-dir", str(tmp_path / "models"), "--json").stdout)
    assert [m["type"] for m in listed["models"]] == ["demo-wan2.2-t2v-a14b"]
    video = tmp_path / "x.mp4"
    gen = run("generate", "--model", str(tmp_path / "models" / "m"), "--prompt", "a cat", "--steps", "2",
              "--seed", "3", "--out", str(video), "--json")
    assert gen.returncode == 0, gen.stderr
    summary = json.loads(gen.stdout)
    for key in ("path", "seed", "frames", "width", "height", "seconds", "offload", "loras"):
        assert key in summary
    assert summary["seed"] == 3 and summary["frames"] == 9
    assert iio.imread(video).shape == (9, 64, 64, 3)


@pytest.mark.parametrize("args,message", [
    (["--height", "100"], "error: height 100 must be a multiple of 16"),
    (["--frames", "10"], "error: frames 10 must be 4k+1"),
    (["--lora", "x.safetensors=abc"], "weight 'abc' is not a number"),
])
def test_bad_generate_input_is_one_clear_line(args, message, demo_model, tmp_path):
    model = demo_model("wan2.1-t2v-1.3b")
    out = run("generate", "--model", str(model), "--prompt", "a cat", "--out", str(tmp_path / "x.mp4"), *args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_not_a_model_folder_and_existing_demo_out(tmp_path):
    out = run("generate", "--model", str(tmp_path), "--prompt", "a", "--out", str(tmp_path / "x.mp4"))
    assert out.returncode == 2 and "no model_index.json" in out.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    out = run("demo", "--out", str(tmp_path / "taken"))
    assert out.returncode == 2 and "exists and is not empty" in out.stderr
