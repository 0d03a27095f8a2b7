"""End-to-end generation on every demo architecture, seeding, cancel, and the written MP4."""
from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest

from engine.facade import Engine, Settings
from engine.port import Failed, Step, VideoChunk
from engine.types import GenerationCancelled, GenerationRequest
from engine.run.video import read_metadata

ARCHS = ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"]


def _engine(model_dir, tmp_path) -> Engine:
    return Engine(Settings(models_dir=model_dir.parent, outputs_dir=tmp_path / "out", loras_dir=tmp_path / "loras",
                           data_dir=tmp_path / "data"))


def _frames(path) -> np.ndarray:
    return iio.imread(path)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_writes_the_requested_video(arch, demo_model, tmp_path, start_image):
    model = demo_model(arch)
    engine = _engine(model, tmp_path)
    spec = engine.spec(f"demo-{arch}")
    image = str(start_image) if spec.task in ("i2v", "ti2v") else None
    width, height = spec.size_multiple * 3, spec.size_multiple * 2
    steps = []
    result = engine.generate(
        GenerationRequest(model=model.name, prompt="a cat", image=image, width=width, height=height, frames=13,
                          steps=2, seed=7),
        lambda event: steps.append(event) if isinstance(event, Step) else None,
    )
    frames = _frames(result.path)
    assert frames.shape == (13, height, width, 3)
    assert (result.frames, result.width, result.height) == (13, width, height)
    assert [s.step for s in steps] == [1, 2]
    assert all(s.preview_gif and s.preview_gif[:6] == b"GIF89a" for s in steps)  # encoded bytes, not images
    meta = read_metadata(result.path)
    assert meta["seed"] == 7 and meta["model_type"] == f"demo-{arch}" and meta["prompt"] == "a cat"
    assert Path(result.path).with_suffix(".json").exists()
    assert steps[0].expert == ("high_noise" if spec.dual_expert else "single")


def test_ti2v_runs_without_an_image_too(demo_model, tmp_path):
    model = demo_model("wan2.2-ti2v-5b")
    result = _engine(model, tmp_path).generate(GenerationRequest(model=model.name, prompt="waves", steps=1, seed=1))
    assert _frames(result.path).shape[0] == 9


def test_same_request_gives_the_same_frames_and_another_seed_does_not(demo_model, tmp_path):
    model = demo_model("wan2.1-t2v-1.3b")
    engine = _engine(model, tmp_path)
    req = GenerationRequest(model=model.name, prompt="a red fox", steps=2, seed=123)
    a = _frames(engine.generate(req).path)
    b = _frames(engine.generate(req).path)
    c = _frames(engine.generate(GenerationRequest(model=model.name, prompt="a red fox", steps=2, seed=124)).path)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_seed_is_drawn_and_reported(demo_model, tmp_path):
    model = demo_model("wan2.1-t2v-1.3b")
    result = _engine(model, tmp_path).generate(GenerationRequest(model=model.name, prompt="x", steps=1))
    assert 0 <= result.seed < 2**32
    assert read_metadata(result.path)["seed"] == result.seed


def test_cancel_stops_within_one_step_and_the_engine_stays_usable(demo_model, tmp_path):
    model = demo_model("wan2.2-t2v-a14b")
    engine = _engine(model, tmp_path)
    seen = []

    failed = []

    def on_event(event):
        if isinstance(event, Step):
            seen.append(event.step)
            if event.step == 2:
                engine.cancel()
        elif isinstance(event, Failed):
            failed.append(event)

    with pytest.raises(GenerationCancelled, match="after step 2 of 6"):
        engine.generate(GenerationRequest(model=model.name, prompt="x", steps=6, seed=1), on_event)
    assert seen == [1, 2]
    assert [f.cancelled for f in failed] == [True]
    assert not list(tmp_path.rglob("*.mp4"))
    [record] = engine.outputs()  # the stopped run is listed for the gallery, with its settings
    assert record.status == "stopped" and record.video is None and "step 2 of 6" in record.message
    result = engine.generate(GenerationRequest(model=model.name, prompt="x", steps=1, seed=1))
    assert _frames(result.path).shape[0] == 9


def test_streamed_chunks_add_up_to_the_video(demo_model, tmp_path):
    model = demo_model("wan2.1-t2v-1.3b")
    chunks = []
    result = _engine(model, tmp_path).generate(
        GenerationRequest(model=model.name, prompt="x", steps=1, seed=3, frames=13),
        lambda event: chunks.append(event.path) if isinstance(event, VideoChunk) else None,
        stream_video=True,
    )
    lengths = [imageio_ffmpeg.count_frames_and_secs(c)[0] for c in chunks]
    assert all(c.endswith(".ts") for c in chunks)
    assert lengths == [1, 4, 4, 4]
    assert result.frames == 13
