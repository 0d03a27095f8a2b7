"""Write MP4s with imageio-ffmpeg (h264, yuv420p), atomically, with the settings embedded as JSON."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable

from engine.types import WanStackError

log = logging.getLogger(__name__)
METADATA_KEY = "comment"  # ffprobe shows it as format.tags.comment


class VideoWriteError(WanStackError):
    pass


def _tmp_beside(path: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def write_mp4(frames: Iterable, path: str | os.PathLike, fps: int, settings: dict | None = None,
              container: str = "mp4") -> Path:
    """frames: HxWx3 uint8 arrays. Written to a temp name, then os.replace; a failure leaves no file.

    `container="mpegts"` writes an MPEG-TS segment (for streaming players) instead of an MP4.
    """
    import imageio_ffmpeg
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path, ".ts" if container == "mpegts" else ".mp4")
    output_params = ["-f", container]
    if settings is not None:
        output_params = ["-metadata", f"{METADATA_KEY}={json.dumps(settings, sort_keys=True)}"] + output_params
    if container == "mp4":
        output_params += ["-movflags", "+faststart"]
    writer = None
    count = 0
    try:
        for frame in frames:
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            if writer is None:
                h, w = frame.shape[:2]
                writer = imageio_ffmpeg.write_frames(
                    str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=8,
                    macro_block_size=1, output_params=output_params,
                )
                writer.send(None)
            writer.send(frame)
            count += 1
        if writer is None:
            raise VideoWriteError(f"no frames to write to {path}")
        writer.close()
        writer = None
        if tmp.stat().st_size == 0:
            raise VideoWriteError(f"ffmpeg wrote an empty file for {path}")
        os.replace(tmp, path)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # the original error matters more than a second one from closing
                log.debug("closing ffmpeg after a failure also failed", exc_info=True)
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %d frames to %s", count, path)
    return path


def write_sidecar(path: str | os.PathLike, settings: dict) -> Path:
    """The same settings JSON beside the video (video.mp4 -> video.json), written atomically."""
    path = Path(path).with_suffix(".json")
    tmp = _tmp_beside(path, ".json")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The settings JSON embedded in an MP4 written by write_mp4 ({} when absent)."""
    import subprocess

    import imageio_ffmpeg

    exe = imageio_ffmpeg.get_ffmpeg_exe()
    proc = subprocess.run([exe, "-hide_banner", "-i", str(path), "-f", "ffmetadata", "-"],
                          capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(f"{METADATA_KEY}="):
            raw = line[len(METADATA_KEY) + 1:].replace("\\=", "=").replace("\\;", ";").replace("\\#", "#")
            raw = raw.replace("\\\\", "\\")
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                return {}
    return {}
