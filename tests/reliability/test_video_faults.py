"""Video and sidecar writes under faults: full disk, killed encoder, huge settings, checked before rename."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from faultkit import fill, python
from engine.fileio import clean_stale_temps, is_temp_name
from engine.run.video import VideoWriteError, probe_video, read_metadata, write_mp4, write_sidecar


def noise(n: int, size: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_full_disk_during_encode_leaves_no_file(small_disk):
    disk = small_disk(96 * 1024)  # noise frames do not compress: the encode runs out of space
    with pytest.raises(VideoWriteError, match="full"):
        write_mp4(noise(40, 96), disk / "v.mp4", 8, {"prompt": "x"})
    assert list(disk.iterdir()) == []


def test_full_disk_at_the_trailer_leaves_no_file(small_disk):
    """The frames fit but the MP4's index (moov, rewritten to the front by +faststart) does not."""
    disk = small_disk(256 * 1024)
    frames = noise(12, 64, seed=1)
    # find the disk size where the frames fit but the finished file does not: fill all but ~1.3x the data
    probe = write_mp4(frames, disk / "probe.mp4", 8)
    size = probe.stat().st_size
    probe.unlink()
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * (256 * 1024 - size - 2048))
    with pytest.raises(VideoWriteError):
        write_mp4(frames, disk / "v.mp4", 8)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_sidecar_on_a_full_disk(small_disk):
    disk = small_disk(64 * 1024)
    (disk / "v.json").write_text('{"old": true}')
    fill(disk)
    with pytest.raises(VideoWriteError, match="full"):
        write_sidecar(disk / "v.mp4", {"prompt": "p" * 100_000})
    assert (disk / "v.json").read_text() == '{"old": true}'
    assert not [p for p in disk.iterdir() if is_temp_name(p.name)]


def test_a_megabyte_prompt_goes_in_a_file_not_on_the_command_line(tmp_path):
    settings = {"prompt": "a fox; = # \\ \n" * 80_000, "seed": 3}  # ~1.1 MB, past Linux's 128 KiB argument limit
    path = write_mp4(noise(3, 32), tmp_path / "v.mp4", 8, settings)
    assert read_metadata(path) == settings
    p = probe_video(path)
    assert (p.codec, p.width, p.height, p.frames) == ("h264", 32, 32, 3)


def test_ffmpeg_failure_is_reported_and_leaves_nothing(tmp_path):
    # odd width: libx264 with yuv420p refuses it, ffmpeg exits non-zero
    with pytest.raises(VideoWriteError, match="ffmpeg could not write"):
        write_mp4([np.zeros((33, 31, 3), np.uint8)] * 3, tmp_path / "v.mp4", 8)
    assert list(tmp_path.iterdir()) == []


def test_kill_9_during_encode_leaves_only_a_temp_that_startup_removes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    child = python(
        "import time, numpy as np\n"
        "from engine.run.video import write_mp4\n"
        "def frames():\n"
        "    for i in range(10000):\n"
        "        time.sleep(0.01)\n"
        "        yield np.full((32, 32, 3), i % 255, np.uint8)\n"
        f"write_mp4(frames(), {str(out / 'v.mp4')!r}, 8, {{'prompt': 'x'}})\n")
    deadline = time.monotonic() + 60
    while not any(is_temp_name(p.name) for p in out.iterdir()):
        assert child.poll() is None and time.monotonic() < deadline, "the encode did not start"
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    names = [p.name for p in out.iterdir()]
    assert "v.mp4" not in names and all(is_temp_name(n) for n in names), names
    removed = clean_stale_temps(out)
    assert removed and list(out.iterdir()) == []


def test_clean_stale_temps_keeps_live_writers(tmp_path):
    live = tmp_path / f".wanstack-tmp.{os.getpid()}.abcd.x.mp4"
    dead = tmp_path / ".wanstack-tmp.999999999.abcd.y.mp4"
    other = tmp_path / "keep.mp4"
    for p in (live, dead, other):
        p.write_bytes(b"x")
    assert clean_stale_temps(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
