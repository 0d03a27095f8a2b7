"""Preset store edge cases: atomic concurrent saves, unreadable files listed untouched, bad names, exports and .lset import."""
import json
import multiprocessing
import threading

import pytest

from engine.presets import (
    Preset,
    PresetError,
    PresetStore,
    mark_entries,
    parse_json,
    parse_lset,
    slugify,
)

T2V = "demo-wan2.1-t2v-1.3b"
A14B = "demo-wan2.2-t2v-a14b"


def _preset(name="Fast anime", n=1, model_type=T2V):
    return Preset(name, model_type, [{"file": f"lora{i}.safetensors", "weight": 0.5 + i} for i in range(n)])


def test_save_load_roundtrip_keeps_created(tmp_path):
    store = PresetStore(tmp_path)
    path = store.save(_preset())
    assert path == tmp_path / "fast-anime.json"
    first = store.load("Fast anime")
    assert first.entries == [{"file": "lora0.safetensors", "weight": 0.5, "applies_to": "both", "enabled": True}]
    assert first.created and first.updated
    store.save(_preset(n=2))
    second = store.load("fast anime")  # same slug
    assert second.created == first.created
    assert len(second.entries) == 2
    assert [p.name for p in store.list()] == ["Fast anime"]
    assert not list(tmp_path.glob("*.tmp"))


def _save_many(root, worker, count):
    store = PresetStore(root)
    for i in range(count):
        store.save(_preset(n=1 + (worker + i) % 4))


def test_concurrent_saves_from_threads_and_processes_leave_one_valid_file(tmp_path):
    threads = [threading.Thread(target=_save_many, args=(tmp_path, w, 15)) for w in range(4)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_save_many, args=(tmp_path, 10 + w, 15)) for w in range(2)]
    for t in threads + procs:
        t.start()
    for t in threads + procs:
        t.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["fast-anime.json"], files  # no temp files, nothing moved aside
    preset = PresetStore(tmp_path).load("Fast anime")
    assert 1 <= len(preset.entries) <= 4


def test_unreadable_files_are_listed_with_the_reason_and_never_changed(tmp_path):
    store = PresetStore(tmp_path)
    store.save(_preset("Good"))
    broken = '{"schema": 1, "name": "Broken", "entries": ['
    newer = json.dumps({"schema": 99, "name": "From the future", "model_type": T2V, "entries": []})
    (tmp_path / "broken.json").write_text(broken)
    (tmp_path / "wrongschema.json").write_text(newer)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    rows = {p.slug: p for p in store.list()}
    assert rows["good"].problem == ""
    assert "not valid JSON" in rows["broken"].problem
    assert rows["wrongschema"].name == "From the future" and "newer WanStack" in rows["wrongschema"].problem
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing renamed or rewritten
    assert (tmp_path / "broken.json").read_text() == broken
    with pytest.raises(PresetError, match="not valid JSON"):
        store.load("broken")


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", "a\\b", "..", "", "   ", "x" * 200, "bad\x00name", "tab\tname"])
def test_bad_names_are_refused(tmp_path, name):
    store = PresetStore(tmp_path / "presets")
    with pytest.raises(PresetError):
        store.save(_preset(name))
    with pytest.raises(PresetError):
        store.load(name)
    assert not (tmp_path / "etc").exists()
    assert not any(tmp_path.rglob("*.json"))


def test_names_are_sanitised():
    assert slugify("Fast  Anime!! v2") == "fast-anime-v2"
    assert slugify("Ünïcode name") == "unicode-name"
    with pytest.raises(PresetError, match="no letters or digits"):
        slugify("???")


def test_entry_paths_must_stay_in_lora_folder(tmp_path):
    store = PresetStore(tmp_path)
    for file in ["../../etc/passwd", "/etc/passwd", "C:\\x.safetensors", "a/../../b.safetensors"]:
        with pytest.raises(PresetError, match="outside the LoRA folder"):
            store.save(Preset("p", T2V, [{"file": file, "weight": 1.0}]))


def test_rename_duplicate_delete(tmp_path):
    store = PresetStore(tmp_path)
    store.save(_preset("One"))
    store.save(_preset("Two"))
    with pytest.raises(PresetError, match="already exists"):
        store.rename("One", "two")
    renamed = store.rename("One", "Uno")
    assert renamed.name == "Uno" and not (tmp_path / "one.json").exists()
    copy = store.duplicate("Uno")
    assert copy.name == "Uno copy" and store.duplicate("Uno").name == "Uno copy 2"
    store.delete("Uno copy")
    assert sorted(store.names()) == ["Two", "Uno", "Uno copy 2"]
    with pytest.raises(PresetError, match="not found"):
        store.delete("Uno copy")


def test_export_import_roundtrip_and_schema_errors(tmp_path):
    store = PresetStore(tmp_path / "a")
    store.save(_preset("Shared", n=2))
    raw = store.export_path("Shared").read_bytes()
    other = PresetStore(tmp_path / "b")
    imported = other.import_bytes(raw, "shared.json")
    assert imported.entries == store.load("Shared").entries
    again = other.import_bytes(raw, "shared.json")
    assert again.name == "Shared copy"  # an import never overwrites silently
    bad = {
        b"not json": "not valid JSON",
        b"[]": "not a JSON object",
        json.dumps({"schema": 2}).encode(): "schema 2",
        json.dumps({"schema": 1, "name": "x", "model_type": "nope", "entries": []}).encode(): "model_type 'nope'",
        json.dumps({"schema": 1, "name": "x", "model_type": T2V, "entries": [{"file": "a", "weight": 50}]}).encode(): "between -10 and 10",
        json.dumps({"schema": 1, "name": "x", "model_type": T2V, "entries": [], "evil": 1}).encode(): "unknown field",
    }
    for payload, message in bad.items():
        with pytest.raises(PresetError, match=message):
            parse_json(payload)


def test_lset_import_maps_phase_multipliers_onto_experts():
    lset = json.dumps({
        "loras": ["lightx2v_high.safetensors", "lightx2v_low.safetensors", "style.safetensors", "motion.safetensors", "off.safetensors"],
        "loras_mult": "1;0 0;1 0.8 0.9,0.8,0.7 0;0",
        "prompt": "a cat",
    })
    preset = parse_lset(lset, A14B, "Lightning", known_files=["speed/lightx2v_high.safetensors"])
    rows = preset.entries
    assert rows[0] == {"file": "speed/lightx2v_high.safetensors", "weight": 1.0, "applies_to": "high_noise", "enabled": True}
    assert rows[1] == {"file": "lightx2v_low.safetensors", "weight": 1.0, "applies_to": "low_noise", "enabled": True}
    assert rows[2]["weight"] == 0.8 and rows[2]["applies_to"] == "both"
    assert rows[3]["weight"] == [0.9, 0.8, 0.7]  # a time-based list is kept as a schedule (issue 11)
    assert rows[4]["enabled"] is False
    assert "prompt from .lset: a cat" in preset.notes

    split = parse_lset(json.dumps({"loras": ["a.safetensors"], "loras_mult": "0.5;1.5"}), A14B, "s")
    assert split.entries[0] == {"file": "a.safetensors", "weight": 0.5, "applies_to": "both", "low_noise_weight": 1.5, "enabled": True}
    missing_mult = parse_lset(json.dumps({"loras": ["a.safetensors", "b.safetensors"], "loras_mult": "0.7"}), T2V, "m")
    assert [e["weight"] for e in missing_mult.entries] == [0.7, 1.0]
    single = parse_lset(json.dumps({"loras": ["a.safetensors"], "loras_mult": "1;0"}), T2V, "one")
    assert single.entries[0]["weight"] == [1.0, 0.0] and "one-expert model" in single.notes


def test_lset_errors(tmp_path):
    with pytest.raises(PresetError, match="no 'loras' list"):
        parse_lset(b'{"loras_mult": "1"}', T2V, "x")
    with pytest.raises(PresetError, match="not a number"):
        parse_lset(b'{"loras": ["a.safetensors"], "loras_mult": "abc"}', T2V, "x")
    with pytest.raises(PresetError, match="outside the LoRA folder"):
        parse_lset(b'{"loras": ["../../etc/passwd"], "loras_mult": "1"}', T2V, "x")
    store = PresetStore(tmp_path)
    with pytest.raises(PresetError, match="pick a model"):
        store.import_bytes(b'{"loras": []}', "x.lset")
    imported = store.import_bytes(b'{"loras": ["a.safetensors"], "loras_mult": "2"}', "My set.lset", model_type=T2V)
    assert imported.name == "My set" and imported.entries[0]["weight"] == 2.0


def test_missing_and_changed_files_are_marked_not_dropped():
    entries = [
        {"file": "ok.safetensors", "weight": 1.0, "sha256": "aa"},
        {"file": "gone.safetensors", "weight": 1.0},
        {"file": "edited.safetensors", "weight": 1.0, "sha256": "bb"},
    ]
    marked = mark_entries(entries, {"ok.safetensors": "aa", "edited.safetensors": "cc"})
    assert [m["status"] for m in marked] == ["ok", "missing", "changed"]
    assert "not in the LoRA folder" in marked[1]["problem"]


def test_shipped_presets_use_the_demo_loras_of_their_model(tmp_path):
    import shutil
    from pathlib import Path

    from engine.models.catalog import get_spec
    from engine.models.demo_loras import DEMO_LORAS
    from engine.lora.planning import cap_problem
    from engine.types import Stack

    shipped = Path(__file__).resolve().parents[2] / "presets"
    shutil.copytree(shipped, tmp_path / "presets")  # a broken file would be moved aside: not in the repo
    store = PresetStore(tmp_path / "presets")
    presets = [store.load(p.name) for p in store.list()]
    assert len(presets) == len(list(shipped.glob("*.json"))) >= 2 and not any(p.problem for p in store.list())
    for preset in presets:
        spec = get_spec(preset.model_type)
        assert cap_problem(spec, Stack.from_list(preset.entries)) is None
        if not spec.demo:  # speed presets for real models name the user's files (tests/engine/speed/test_presets.py)
            assert preset.settings and all(e["file"] not in DEMO_LORAS for e in preset.entries)
            continue
        for entry in preset.entries:
            arch = DEMO_LORAS[entry["file"]][0]
            assert preset.model_type == f"demo-{arch}", (preset.name, entry["file"])
        assert cap_problem(spec, Stack.from_list(preset.entries)) is None
