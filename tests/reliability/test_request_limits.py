"""Requests refused at the door: runs the memory plan says cannot fit (with what to lower and the override),
sizes past the model's position table, and `generate --preset NAME` on the command line."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.models.catalog import get_spec
from engine.memory import plan_for
from engine.memory.errors import NotEnoughMemory
from engine.memory.snapshot import MemorySnapshot
from engine.run.request import check_model_limits, refuse_unfit, resolve_request
from engine.types import GenerationRequest, RequestError

ROOT = Path(__file__).resolve().parents[2]
SPEC = get_spec("demo-wan2.1-t2v-1.3b")


def test_unfit_run_is_refused_with_the_reason_and_what_to_lower():
    snap = MemorySnapshot.unavailable("test: no GPU", ram_total_bytes=8 << 30, ram_available_bytes=5 << 30)
    req = GenerationRequest(model="m", prompt="p", width=1024, height=1024, frames=253)
    r = resolve_request(req, SPEC)
    plan = plan_for(SPEC, r.height, r.width, r.frames, snapshot=snap, dtype="fp32")
    assert not plan.fits
    with pytest.raises(NotEnoughMemory) as e:
        refuse_unfit(plan, SPEC, r, 0, snap, "auto", 0, "fp32")
    msg = str(e.value)
    assert "cannot fit" in msg and "needs 14.8 gib of ram" in msg.lower() and "--ignore-memory-plan" in msg
    # the suggested frame count really fits, the next one up does not
    suggested = int(msg.split("lower frames to ")[1].split()[0])
    assert plan_for(SPEC, 1024, 1024, suggested, snapshot=snap, dtype="fp32").fits
    assert not plan_for(SPEC, 1024, 1024, suggested + 4, snapshot=snap, dtype="fp32").fits


def test_when_no_frame_count_fits_it_says_to_lower_the_resolution():
    snap = MemorySnapshot.unavailable("test: no GPU", ram_total_bytes=4 << 30, ram_available_bytes=2 << 30)
    r = resolve_request(GenerationRequest(model="m", prompt="p", width=1024, height=1024, frames=81), SPEC)
    plan = plan_for(SPEC, r.height, r.width, r.frames, snapshot=snap, dtype="fp32")
    with pytest.raises(NotEnoughMemory, match="even 1 frame at 1024x1024 does not fit: lower the resolution"):
        refuse_unfit(plan, SPEC, r, 0, snap, "auto", 0, "fp32")


def test_a_run_that_fits_is_not_refused():
    snap = MemorySnapshot.unavailable("test: no GPU", ram_total_bytes=64 << 30, ram_available_bytes=32 << 30)
    r = resolve_request(GenerationRequest(model="m", prompt="p"), SPEC)
    plan = plan_for(SPEC, r.height, r.width, r.frames, snapshot=snap, dtype="fp32")
    refuse_unfit(plan, SPEC, r, 0, snap, "auto", 0, "fp32")


@pytest.mark.parametrize("size, field", [((4096, 4096, 1001), "frames"), ((2048, 64, 9), "width"),
                                         ((64, 2048, 9), "height")])
def test_sizes_past_the_models_positions_are_refused(size, field):
    w, h, f = size
    r = resolve_request(GenerationRequest(model="m", prompt="p", width=w, height=h, frames=f), SPEC)
    with pytest.raises(RequestError, match=f"^{field} .*at most"):
        check_model_limits(r, SPEC, {"rope_max_seq_len": 64, "patch_size": [1, 2, 2]})


def test_engine_refuses_the_issue_request_before_any_work(demo_model, tmp_path):
    """4096x4096x1001 on the demo model: refused in well under a second, no torch import, no output."""
    from engine.facade import Engine, Settings

    model = demo_model("wan2.1-t2v-1.3b")
    engine = Engine(Settings(models_dir=model.parent, loras_dir=tmp_path, outputs_dir=tmp_path / "out"))
    t0 = time.perf_counter()
    with pytest.raises(RequestError, match="frames 1001 is more than"):
        engine.generate(GenerationRequest(model=str(model), prompt="p", width=4096, height=4096, frames=1001))
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_cli_generate_with_a_preset(demo_model, demo_loras_dir, tmp_path):
    model = demo_model("wan2.1-t2v-1.3b")
    presets = tmp_path / "presets"
    presets.mkdir()
    lora = next(p for p in sorted(demo_loras_dir.rglob("*.safetensors")) if "style" in p.name)
    (presets / "mine.json").write_text(json.dumps({
        "schema": 1, "name": "Mine", "model_type": "demo-wan2.1-t2v-1.3b",
        "entries": [{"file": lora.relative_to(demo_loras_dir).as_posix(), "weight": 0.5}],
        "notes": "", "created": "", "updated": ""}))
    out = tmp_path / "x.mp4"
    proc = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", str(model), "--prompt", "a cat",
                           "--preset", "Mine", "--presets-dir", str(presets), "--loras-dir", str(demo_loras_dir),
                           "--steps", "1", "--out", str(out), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert [r["status"] for r in summary["loras"]] == ["applied"] and out.is_file()


@pytest.mark.parametrize("name, message", [("bad\x00name", "plain folder name"), ("x" * 300, "at most 100"),
                                           (".hidden", "plain folder name"),
                                           ("demo-wan2.1-t2v-1.3b", "already a model here")])
def test_merge_names_are_refused_before_any_work(demo_model, demo_loras_dir, tmp_path, name, message):
    from engine.facade import Engine, Settings
    from engine.types import LoraEntry, Stack

    model = demo_model("wan2.1-t2v-1.3b")
    lora = next(p.relative_to(demo_loras_dir).as_posix() for p in sorted(demo_loras_dir.rglob("*style*")))
    models = tmp_path / "models"
    models.mkdir()
    data = tmp_path / "data"
    (data / "demo-models").mkdir(parents=True)
    (data / "demo-models" / model.name).symlink_to(model)
    engine = Engine(Settings(models_dir=models, loras_dir=demo_loras_dir, data_dir=data))
    with pytest.raises(RequestError, match=message):
        engine.merge_stack(model.name, Stack((LoraEntry(lora),)), name)
    assert list(models.iterdir()) == []
