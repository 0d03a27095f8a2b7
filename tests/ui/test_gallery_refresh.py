"""The gallery follows the outputs folder without a click: each page asks for the folder's version (one stat)
and re-reads the list only when it changed."""
from __future__ import annotations

import os
import time

from engine.run.outputs import outputs_version
from engine.port import OutputView
from fake_engine import FakeEngine
from ui.context import UIContext
from ui.gallery import GalleryPanel


def _settled(path, seconds_ago: float = 5.0) -> None:
    t = time.time() - seconds_ago
    os.utime(path, (t, t))


def test_version_changes_when_a_run_is_added_or_removed_and_waits_for_a_fresh_change(tmp_path):
    out = tmp_path / "outputs"
    assert outputs_version(out) == ""  # no folder yet
    out.mkdir()
    assert outputs_version(out) is None  # just made: ask again
    _settled(out)
    first = outputs_version(out)
    assert first and outputs_version(out) == first  # nothing changed: the same token
    tmp = out / ".run.mp4.tmp"
    tmp.write_bytes(b"x")
    tmp.replace(out / "run.mp4")  # how every file gets there: a rename into the folder
    assert outputs_version(out) is None
    _settled(out, 3.0)
    second = outputs_version(out)
    assert second not in (None, first)
    (out / "run.mp4").unlink()
    _settled(out, 2.0)
    assert outputs_version(out) not in (None, first, second)


def _panel(engine):
    return GalleryPanel(UIContext(engine), editor=None)


def _run(n: int) -> OutputView:
    return OutputView(id=f"run{n}", status="done", video=None, thumbnail=f"/tmp/run{n}.png", created="",
                      caption=f"run {n}")


def test_a_tick_re_lists_only_when_the_folder_changed(tmp_path):
    engine = FakeEngine(tmp_path)
    calls = []
    listed = engine.outputs
    engine.outputs = lambda limit=60: calls.append(1) or listed(limit)
    panel = _panel(engine)

    engine.past_runs, engine.outputs_stamp = [_run(1)], "v1"
    update, seen = panel.tick(None)  # first tick of a page: lists once
    assert seen == "v1" and update["value"] == [("/tmp/run1.png", "run 1")] and len(calls) == 1
    update, seen = panel.tick(seen)
    assert update == {"__type__": "update"} and seen == "v1" and len(calls) == 1  # unchanged: no listing

    engine.past_runs, engine.outputs_stamp = [_run(2), _run(1)], None  # another tab's run, still being written
    update, seen = panel.tick(seen)
    assert len(update["value"]) == 2 and seen is None
    engine.outputs_stamp = "v2"
    update, seen = panel.tick(seen)  # settled: listed once more (a sidecar may have come in the same tick)
    assert seen == "v2" and len(calls) == 3
    assert panel.tick(seen) == ({"__type__": "update"}, "v2") and len(calls) == 3


def test_a_failing_tick_keeps_the_gallery_and_says_nothing_to_the_page(tmp_path):
    engine = FakeEngine(tmp_path)

    def broken():
        raise PermissionError(13, "Permission denied", str(tmp_path / "outputs"))

    engine.outputs_version = broken
    assert _panel(engine).tick("v1") == ({"__type__": "update"}, "v1")


def test_the_page_polls_with_a_timer_wired_to_the_gallery(tmp_path):
    from ui import build_ui
    from ui.gallery import POLL_SECONDS

    demo = build_ui(FakeEngine(tmp_path))
    timers = [b for b in demo.blocks.values() if type(b).__name__ == "Timer"]
    assert len(timers) == 1 and timers[0].value == POLL_SECONDS <= 5
    by_id = {getattr(b, "elem_id", None): b._id for b in demo.blocks.values()}
    ticks = [d for d in demo.config["dependencies"] if [t[0] for t in d["targets"]] == [timers[0]._id]]
    assert len(ticks) == 1 and by_id["history"] in ticks[0]["outputs"]
    assert ticks[0]["queue"] is False and ticks[0]["show_progress"] == "hidden"
