"""Streaming video needs ffmpeg and ffprobe on PATH (Gradio runs both): setup installs them; without them the
engine turns streaming off with one note and the run still ends in its MP4."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from engine.facade import Engine, Settings
from engine.port import VideoChunk
from engine.types import GenerationRequest
from engine.run.video import probe_video, streaming_unavailable

ARCH = "wan2.1-t2v-1.3b"


def test_the_check_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "ffmpeg and ffprobe" in streaming_unavailable() and "setup.sh" in streaming_unavailable()
    (tmp_path / "ffmpeg").write_text("#!/bin/sh\n")
    (tmp_path / "ffmpeg").chmod(0o755)
    assert "needs ffprobe on PATH" in streaming_unavailable()
    (tmp_path / "ffprobe").write_text("#!/bin/sh\nexit 1\n")  # present but broken: Gradio would fail per segment
    (tmp_path / "ffprobe").chmod(0o755)
    assert "ffprobe on PATH" in streaming_unavailable() and "does not run" in streaming_unavailable()


def test_setup_installs_the_streaming_tools():
    """On a machine set up by scripts/setup.sh as root (CI, the dev machines) both tools are on PATH."""
    if os.geteuid() != 0:
        pytest.skip("setup.sh installs ffmpeg only as root")
    assert streaming_unavailable() is None, "run 'bash scripts/setup.sh': " + str(streaming_unavailable())
    text = (Path(__file__).resolve().parents[2] / "scripts" / "setup.sh").read_text()
    assert "APT+=(ffmpeg)" in text


@pytest.mark.slow
def test_without_the_tools_streaming_is_off_with_one_note(demo_model, tmp_path, monkeypatch):
    model = demo_model(ARCH)
    engine = Engine(Settings(models_dir=model.parent, outputs_dir=tmp_path / "out", loras_dir=tmp_path / "l"))
    req = GenerationRequest(model=model.name, prompt="a cat", steps=1, seed=4)
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))  # our own encoding uses imageio-ffmpeg's binary, not PATH
    events = []
    result = engine.generate(req, events.append, stream_video=True)
    assert not [e for e in events if isinstance(e, VideoChunk)]
    notes = [n for n in result.notes if "streaming is off" in n]
    assert len(notes) == 1 and probe_video(result.path).frames == result.frames
    monkeypatch.undo()
    if shutil.which("ffmpeg") and shutil.which("ffprobe"):
        events.clear()
        result = engine.generate(req, events.append, stream_video=True)
        assert [e for e in events if isinstance(e, VideoChunk)] and not any("streaming is off" in n for n in result.notes)
