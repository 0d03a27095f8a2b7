"""Write MP4s with imageio-ffmpeg's ffmpeg (h264, yuv420p), atomically and checked, with the settings embedded.

The encoder's exit status is checked and the file is probed (codec, size, frame count) before it is
renamed to its final name, so a full disk or a crashed encoder never leaves a broken MP4 behind. User
text (the settings JSON holds the prompt) goes to ffmpeg in a metadata file, never on its command line.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from engine.fileio import atomic_path
from engine.types import WanStackError

log = logging.getLogger(__name__)
METADATA_KEY = "comment"  # shown as format.tags.comment by probes
_CRF = 10  # what imageio-ffmpeg's quality=8 meant: visually lossless for the small demo frames
_STDERR_TAIL = 600


class VideoWriteError(WanStackError):
    pass


@dataclass(frozen=True)
class VideoProbe:
    """What a reader sees in a video file (read with the ffmpeg that imageio-ffmpeg ships)."""

    codec: str
    pix_fmt: str
    width: int
    height: int
    fps: float
    frames: int
    seconds: float


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def probe_video(path: str | os.PathLike) -> VideoProbe:
    """Codec, pixel format, size, fps and the decoded frame count of a video; VideoWriteError if unreadable."""
    import imageio_ffmpeg

    path = str(path)
    try:
        reader = imageio_ffmpeg.read_frames(path)
        meta = next(reader)
        reader.close()
        frames, seconds = imageio_ffmpeg.count_frames_and_secs(path)
    except (OSError, RuntimeError, StopIteration, ValueError) as e:
        raise VideoWriteError(f"{Path(path).name} is not a readable video: {str(e)[-_STDERR_TAIL:]}") from None
    w, h = meta.get("size") or (0, 0)
    return VideoProbe(codec=str(meta.get("codec", "")).split(" ")[0], pix_fmt=str(meta.get("pix_fmt", "")).split("(")[0],
                      width=int(w), height=int(h), fps=float(meta.get("fps") or 0), frames=int(frames),
                      seconds=float(seconds))


def streaming_unavailable() -> str | None:
    """Why Gradio's streaming video player cannot work here (it runs `ffmpeg` and `ffprobe` from PATH), or None."""
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:
        return (f"Video streaming is off: the streaming player needs {' and '.join(missing)} on PATH and this "
                "machine has none; run 'bash scripts/setup.sh' as root (it installs Debian's ffmpeg) or install "
                "ffmpeg. The finished video still shows.")
    broken = [tool for tool in ("ffmpeg", "ffprobe") if not _runs(tool)]
    if broken:
        return (f"Video streaming is off: {' and '.join(broken)} on PATH ({shutil.which(broken[0])}) does not run "
                "('-version' failed); reinstall ffmpeg, e.g. with 'bash scripts/setup.sh' as root. "
                "The finished video still shows.")
    return None


def _runs(tool: str) -> bool:
    try:
        return subprocess.run([tool, "-version"], capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _ffmetadata(settings: dict) -> str:
    """An ffmetadata file carrying the settings JSON (its escaping: '\\' '=' ';' '#' and newlines)."""
    value = json.dumps(settings, sort_keys=True)
    for ch in ("\\", "=", ";", "#", "\n"):
        value = value.replace(ch, "\\" + ch)
    return f";FFMETADATA1\n{METADATA_KEY}={value}\n"


def _disk_hint(folder: Path, stderr: str) -> str:
    if "No space left" in stderr or "ENOSPC" in stderr:
        return f"the disk holding {folder} is full; free some space and run again"
    return "see the ffmpeg message"


def write_mp4(frames: Iterable, path: str | os.PathLike, fps: int, settings: dict | None = None,
              container: str = "mp4") -> Path:
    """frames: HxWx3 uint8 arrays. Encoded to a temp name, checked, then renamed; a failure leaves no file.

    `container="mpegts"` writes an MPEG-TS segment (for streaming players) instead of an MP4.
    """
    import numpy as np

    path = Path(path)
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise VideoWriteError(f"no frames to write to {path}")
    first = np.ascontiguousarray(first, dtype=np.uint8)
    h, w = first.shape[:2]
    count = [0]

    def verify(tmp: Path) -> None:
        if container != "mp4":
            if tmp.stat().st_size == 0:
                raise VideoWriteError(f"ffmpeg wrote an empty segment for {path}")
            return
        probe = probe_video(tmp)
        if probe.frames != count[0] or (probe.width, probe.height) != (w, h):
            raise VideoWriteError(
                f"the encoded video for {path.name} is incomplete ({probe.frames} of {count[0]} frames, "
                f"{probe.width}x{probe.height}); nothing was saved")

    with tempfile.TemporaryDirectory(prefix="wanstack-ffmpeg-") as private, atomic_path(path, verify=verify) as tmp:
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "pipe:0"]
        if settings is not None:
            meta = Path(private) / "settings.ffmeta"
            meta.write_text(_ffmetadata(settings), encoding="utf-8")
            cmd += ["-f", "ffmetadata", "-i", str(meta), "-map_metadata", "1", "-map", "0:v"]
        cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(_CRF), "-f", container]
        if container == "mp4":
            cmd += ["-movflags", "+faststart"]
        cmd.append(str(tmp))
        with open(Path(private) / "stderr", "w+b") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
            broken = False
            try:
                proc.stdin.write(first.tobytes())
                count[0] += 1
                for frame in it:
                    frame = np.ascontiguousarray(frame, dtype=np.uint8)
                    if frame.shape[:2] != (h, w):
                        raise VideoWriteError(f"frame {count[0]} is {frame.shape[1]}x{frame.shape[0]}, not {w}x{h}")
                    proc.stdin.write(frame.tobytes())
                    count[0] += 1
            except BrokenPipeError:
                broken = True  # ffmpeg exited early; its status and message say why
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    broken = True
            code = proc.wait()
            err.seek(0)
            message = err.read().decode(errors="replace").strip()[-_STDERR_TAIL:]
        if code != 0 or broken:
            raise VideoWriteError(f"ffmpeg could not write {path.name} (exit {code}): {_disk_hint(path.parent, message)}"
                                  + (f": {message}" if message else ""))
    log.info("wrote %d frames to %s", count[0], path)
    return path


def write_sidecar(path: str | os.PathLike, settings: dict) -> Path:
    """The same settings JSON beside the video (video.mp4 -> video.json), written atomically."""
    from engine.fileio import atomic_write_json

    out = Path(path).with_suffix(".json")
    try:
        return atomic_write_json(out, settings, sort_keys=True)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise VideoWriteError(f"the disk holding {out.parent} is full; free some space and run again") from None
        raise


def read_metadata(path: str | os.PathLike) -> dict:
    """The settings JSON embedded in an MP4 written by write_mp4 ({} when absent)."""
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-f", "ffmetadata", "-"],
                          capture_output=True, text=True, check=False)
    lines = proc.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{METADATA_KEY}="):
            raw = line[len(METADATA_KEY) + 1:]
            # an escaped newline continues the value on the next line
            while raw.endswith("\\") and not raw.endswith("\\\\") and i + 1 < len(lines):
                i += 1
                raw = raw[:-1] + "\n" + lines[i]
            out, esc = [], False
            for ch in raw:
                if esc:
                    out.append(ch)
                    esc = False
                elif ch == "\\":
                    esc = True
                else:
                    out.append(ch)
            try:
                return json.loads("".join(out))
            except json.JSONDecodeError:
                return {}
    return {}
