"""Presets: names sharing a file never overwrite each other, listing never changes a file, and a killed or
out-of-space save leaves the old preset or the new one, never half of one."""
from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from faultkit import fill, python
from engine.fileio import clean_stale_temps, is_temp_name
from engine.presets import Preset, PresetError, PresetStore

T2V = "demo-wan2.1-t2v-1.3b"


def preset(name, weight=0.5, notes=""):
    return Preset(name, T2V, [{"file": "a.safetensors", "weight": weight}], notes=notes)


def test_names_that_share_a_file_do_not_overwrite_each_other(tmp_path):
    store = PresetStore(tmp_path)
    store.save(preset("My Preset", 0.5))
    for other in ("my-preset", "MY PRESET!!", "my  preset"):
        with pytest.raises(PresetError, match="same file .*'My Preset'"):
            store.save(preset(other, 1.5))
    assert store.load("My Preset").entries[0]["weight"] == 0.5
    assert [p.name for p in store.list()] == ["My Preset"]
    store.save(preset("My Preset", 0.7))  # the same name still overwrites its own file
    assert store.load("My Preset").entries[0]["weight"] == 0.7
    store.rename("My Preset", "my preset")  # a new spelling of the same file is a rename, not a clash
    assert [p.name for p in store.list()] == ["my preset"]


def test_listing_keeps_newer_and_extended_presets_intact(tmp_path):
    store = PresetStore(tmp_path)
    files = {
        "future.json": json.dumps({"schema": 2, "name": "Future", "model_type": T2V, "entries": [], "speed": "x"}),
        "extra.json": json.dumps({"schema": 1, "name": "Extra", "model_type": T2V, "entries": [], "color": "red"}),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for _ in range(3):
        rows = {p.slug: p for p in store.list()}
    assert rows["future"].name == "Future" and "schema 2" in rows["future"].problem
    assert rows["extra"].name == "Extra" and "unknown field" in rows["extra"].problem
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    assert all((tmp_path / n).read_text() == t for n, t in files.items())
    with pytest.raises(PresetError, match="cannot read"):
        store.save(Preset("future", T2V, []))  # would replace the newer file: refused
    assert (tmp_path / "future.json").read_text() == files["future.json"]


def test_full_disk_during_a_save_keeps_the_old_preset(small_disk):
    disk = small_disk(64 * 1024)
    store = PresetStore(disk)
    store.save(preset("Keep me", 0.25))
    before = (disk / "keep-me.json").read_bytes()
    fill(disk)
    with pytest.raises(PresetError, match="could not save .*No space left"):
        store.save(preset("Keep me", 0.75, notes="n" * 200_000))
    assert (disk / "keep-me.json").read_bytes() == before
    assert not [p for p in disk.iterdir() if is_temp_name(p.name)]


@pytest.mark.slow
def test_kill_9_during_saves_never_leaves_half_a_preset(tmp_path):
    """Five children saving in a loop are killed at random moments; every final file parses."""
    rng = random.Random(9)
    kills = 0
    for round_ in range(5):
        child = python(
            "from engine.presets import Preset, PresetStore\n"
            f"store = PresetStore({str(tmp_path)!r})\n"
            "i = 0\n"
            "while True:\n"
            "    i += 1\n"
            "    store.save(Preset('Busy', 'demo-wan2.1-t2v-1.3b', [{'file': 'a.safetensors', 'weight': (i % 10) / 10}],"
            " notes='x' * 300_000))\n")
        deadline = time.monotonic() + 60
        while not (tmp_path / "busy.json").exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        kills += 1
        PresetStore(tmp_path).load("Busy")  # parses: the old or the new version, never half
        leftovers = [p for p in tmp_path.iterdir() if is_temp_name(p.name)]
        assert all(p.name.endswith(".part") for p in leftovers)
        clean_stale_temps(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["busy.json"]
    assert kills == 5
