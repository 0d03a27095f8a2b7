"""The outputs folder as a gallery: past runs (videos with their settings sidecars, and the records of
failed or stopped runs), each with a first-frame thumbnail made once and kept in outputs/.thumbs/."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from engine.port import OutputView

log = logging.getLogger(__name__)
THUMBS = ".thumbs"


def list_outputs(outputs_dir: str | Path, limit: int = 60) -> list[OutputView]:
    """Newest first. A video without a sidecar is listed with what its name tells."""
    root = Path(outputs_dir)
    if not root.is_dir():
        return []
    stems: dict[str, dict[str, Path]] = {}
    for path in root.iterdir():
        if path.name.startswith(".") or path.suffix not in (".mp4", ".json") or not path.is_file():
            continue
        stems.setdefault(path.stem, {})[path.suffix] = path
    def mtime(parts: dict[str, Path]) -> float:
        return max(p.stat().st_mtime for p in parts.values())

    ordered = sorted(stems.items(), key=lambda kv: mtime(kv[1]), reverse=True)[:limit]
    return [_view(stem, parts, root) for stem, parts in ordered]


def outputs_version(outputs_dir: str | Path, settle_seconds: float = 1.0) -> str | None:
    """A token that changes when a run is added to or removed from the outputs folder (every write there is
    a rename into it, which sets the folder's mtime), "" while there is no folder. None while the folder
    changed within `settle_seconds`: file times are kept at a kernel tick, so a second write within the
    same tick (the sidecar after its MP4) can leave the mtime as it was; ask again."""
    import os
    import time

    try:
        mtime_ns = os.stat(outputs_dir).st_mtime_ns
    except OSError:
        return ""
    if time.time_ns() - mtime_ns < settle_seconds * 1e9:
        return None
    return str(mtime_ns)


def _view(stem: str, parts: dict[str, Path], root: Path) -> OutputView:
    settings: dict = {}
    if ".json" in parts:
        try:
            settings = json.loads(parts[".json"].read_text(encoding="utf-8"))
            if not isinstance(settings, dict):
                settings = {}
        except (OSError, ValueError) as e:
            log.warning("unreadable sidecar %s: %s", parts[".json"].name, e)
    video = parts.get(".mp4")
    status = "done" if video is not None else str(settings.get("status") or "failed")
    if video is None and status == "done":
        status = "failed"  # a sidecar without its video: the video was removed or never finished
    thumb = _thumbnail(video, root) if video is not None else _placeholder(root, status)
    prompt = str(settings.get("prompt") or "")
    created = str(settings.get("created") or "")
    bits = [status.upper() if status != "done" else "", prompt[:40] + ("…" if len(prompt) > 40 else "")]
    caption = " · ".join(b for b in bits if b) or stem
    return OutputView(id=stem, status=status, video=str(video) if video else None, thumbnail=thumb,
                      created=created, caption=caption, message=str(settings.get("message") or ""), settings=settings)


def _thumbnail(video: Path, root: Path) -> str | None:
    """A PNG of the first frame, made once per video (kept while the video is unchanged)."""
    out = root / THUMBS / f"{video.stem}.png"
    try:
        if out.exists() and out.stat().st_mtime >= video.stat().st_mtime:
            return str(out)
        import imageio_ffmpeg
        import numpy as np
        from PIL import Image

        reader = imageio_ffmpeg.read_frames(str(video))
        meta = next(reader)
        raw = next(reader)
        reader.close()
        w, h = meta["size"]
        frame = np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3)
        image = Image.fromarray(frame)
        if w < 160:  # the demo's tiny videos: scaled up (nearest) so the gallery shows something
            scale = -(-160 // w)
            image = image.resize((w * scale, h * scale), Image.NEAREST)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        image.save(tmp, format="PNG")
        tmp.replace(out)
        return str(out)
    except (OSError, RuntimeError, StopIteration, ValueError) as e:
        log.warning("no thumbnail for %s: %s", video.name, e)
        return None


def _placeholder(root: Path, status: str) -> str | None:
    """A grey card saying 'failed' or 'stopped', for runs that left no video (made once)."""
    out = root / THUMBS / f"_{status}.png"
    if out.exists():
        return str(out)
    try:
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (160, 96), (70, 70, 78) if status == "stopped" else (110, 40, 40))
        draw = ImageDraw.Draw(image)
        draw.text((12, 40), status, fill=(240, 240, 240))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        image.save(tmp, format="PNG")
        tmp.replace(out)
        return str(out)
    except OSError as e:
        log.warning("no placeholder thumbnail in %s: %s", out.parent, e)
        return None
