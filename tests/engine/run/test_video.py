"""MP4s are written atomically: a failed encode leaves no partial file."""
from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from engine.run.video import VideoWriteError, read_metadata, write_mp4, write_sidecar


def test_round_trip_with_metadata(tmp_path):
    frames = [np.full((32, 48, 3), i * 25, np.uint8) for i in range(5)]
    path = write_mp4(frames, tmp_path / "v.mp4", 8, {"prompt": "a = b; #c", "seed": 1})
    back = iio.imread(path)
    assert back.shape == (5, 32, 48, 3)
    assert read_metadata(path) == {"prompt": "a = b; #c", "seed": 1}
    side = write_sidecar(path, {"seed": 1})
    assert side.name == "v.json"


def test_failure_mid_encode_leaves_nothing(tmp_path):
    def frames():
        yield np.zeros((32, 32, 3), np.uint8)
        raise RuntimeError("decoder died")

    with pytest.raises(RuntimeError, match="decoder died"):
        write_mp4(frames(), tmp_path / "v.mp4", 8)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VideoWriteError, match="no frames"):
        write_mp4([], tmp_path / "v.mp4", 8)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_survives_a_failed_rewrite(tmp_path):
    path = write_mp4([np.zeros((16, 16, 3), np.uint8)] * 3, tmp_path / "v.mp4", 8)
    before = path.read_bytes()

    def bad():
        yield np.zeros((16, 16, 3), np.uint8)
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_mp4(bad(), path, 8)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
