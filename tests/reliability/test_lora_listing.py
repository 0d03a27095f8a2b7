"""One bad LoRA file affects only the requests that use it: listing skips it with the reason, special files
(devices, FIFOs, sockets, a symlink to /dev/zero) are never read, and no lock is held across file I/O."""
from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine" / "lora"))
from lora_factory import random_lowrank, tiny_transformer, write_lora  # noqa: E402

from engine.models.catalog import get_spec  # noqa: E402
from engine.lora.errors import LoraFormatError, LoraIncompatibleError  # noqa: E402
from engine.lora.files import read_lora_file, read_lora_shapes  # noqa: E402
from engine.lora.manager import LoraManager  # noqa: E402
from engine.types import LoraEntry, Stack  # noqa: E402

SPEC = get_spec("demo-wan2.1-t2v-1.3b")


def header_only(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "loras"
    root.mkdir()
    model = tiny_transformer(width=16, layers=1)
    write_lora(root / "good.safetensors", "wan", random_lowrank(model, rank=2, targets=["blocks.0.attn1.to_q"]),
               alpha=1.0)
    return root, model


def diff1d(p: Path) -> Path:
    """A 1-D diff aimed at a Linear weight: parses (norm diffs are 1-D), but fits no layer of the model."""
    return header_only(p, b'{"diffusion_model.blocks.0.self_attn.q.diff":{"dtype":"F32","shape":[4],'
                          b'"data_offsets":[0,16]}}', b"\0" * 16)


BAD = {
    "empty.safetensors": lambda p: p.write_bytes(b""),
    "rank0.safetensors": lambda p: header_only(p, b'{"diffusion_model.blocks.0.self_attn.q.lora_down.weight":'
                                                  b'{"dtype":"F32","shape":[0,16],"data_offsets":[0,0]},'
                                                  b'"diffusion_model.blocks.0.self_attn.q.lora_up.weight":'
                                                  b'{"dtype":"F32","shape":[16,0],"data_offsets":[0,0]}}'),
    "alpha-empty.safetensors": lambda p: header_only(
        p, b'{"diffusion_model.blocks.0.self_attn.q.alpha":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
           b'"diffusion_model.blocks.0.self_attn.q.lora_down.weight":{"dtype":"F32","shape":[1,16],"data_offsets":[0,64]},'
           b'"diffusion_model.blocks.0.self_attn.q.lora_up.weight":{"dtype":"F32","shape":[16,1],"data_offsets":[64,128]}}',
        b"\0" * 128),
    "odd-metadata.safetensors": lambda p: header_only(p, b'{"__metadata__": [1, {"a": null}]}'),
    "odd-shape.safetensors": lambda p: header_only(p, b'{"x.lora_down.weight":{"dtype":"F32","shape":[-1, "a"],'
                                                      b'"data_offsets":[0,4]}}', b"\0" * 4),
    "odd-offsets.safetensors": lambda p: header_only(p, b'{"x.lora_down.weight":{"dtype":"F32","shape":[1,1],'
                                                        b'"data_offsets":[8,4]}}', b"\0" * 8),
    "odd-dtype.safetensors": lambda p: header_only(p, b'{"x.lora_down.weight":{"dtype":{"F32":1},"shape":[1,1],'
                                                      b'"data_offsets":[0,4]}}', b"\0" * 4),
    "nested.safetensors": lambda p: header_only(p, b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "truncated.safetensors": lambda p: header_only(p, b'{"x.lora_down.weight":{"dtype":"F32","shape":[64,64],'
                                                      b'"data_offsets":[0,16384]}}', b"\0" * 100),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_file_is_a_format_error_naming_it(tmp_path, name):
    path = tmp_path / name
    BAD[name](path)
    for reader in (read_lora_shapes, read_lora_file):
        with pytest.raises(LoraFormatError, match=name.replace(".", r"\.")):
            from engine.lora.formats import parse_lora

            parse_lora(reader(path))


def test_listing_skips_bad_files_with_reasons_and_generation_without_them_works(folder):
    root, model = folder
    for name, make in BAD.items():
        make(root / name)
    manager = LoraManager(root)
    rows = {r["file"]: r for r in manager.list_loras(SPEC)}
    assert rows["good.safetensors"]["ok"] and rows["good.safetensors"]["compatible"]
    for name in BAD:
        assert rows[name]["ok"] is False and name in rows[name]["reason"], rows[name]
    # a stack without the bad files applies; one with a bad file fails naming it
    report = manager.apply({"single": model}, SPEC, Stack((LoraEntry("good.safetensors"),)))
    assert report[0]["status"] == "applied"
    manager.remove({"single": model})
    with pytest.raises(LoraFormatError, match="rank0.safetensors"):
        manager.apply({"single": model}, SPEC, Stack((LoraEntry("rank0.safetensors"),)))
    diff1d(root / "diff1d.safetensors")
    assert manager.list_loras(SPEC)[0]["file"] == "alpha-empty.safetensors"  # the listing still works
    with pytest.raises(LoraIncompatibleError, match="diff1d.safetensors"):
        manager.apply({"single": model}, SPEC, Stack((LoraEntry("diff1d.safetensors"),)))
    manager.apply({"single": model}, SPEC, Stack())  # no LoRA: unaffected


def _listing_in_time(manager, seconds=20.0):
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("rows", manager.list_loras(SPEC)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the LoRA listing hung on a special file"
    return {r["file"]: r for r in out["rows"]}


def test_special_files_are_never_read(folder, tmp_path):
    root, _ = folder
    os.symlink("/dev/zero", root / "zero.safetensors")
    os.mkfifo(root / "fifo.safetensors")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.safetensors"))
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((root / "good.safetensors").read_bytes())
    os.symlink(outside, root / "escape.safetensors")
    try:
        rows = _listing_in_time(LoraManager(root))
    finally:
        sock.close()
    assert rows["good.safetensors"]["ok"]
    assert "device" in rows["zero.safetensors"]["reason"]
    assert "FIFO" in rows["fifo.safetensors"]["reason"]
    assert "socket" in rows["sock.safetensors"]["reason"]
    assert "outside the LoRA folder" in rows["escape.safetensors"]["reason"]
    for name in ("zero", "fifo", "sock"):
        for reader in (read_lora_file, read_lora_shapes):
            with pytest.raises(LoraFormatError, match=name):
                reader(root / f"{name}.safetensors")


def test_listing_bounds_what_it_hashes(folder, monkeypatch):
    root, _ = folder
    import engine.lora.library as library_mod

    monkeypatch.setattr(library_mod, "LIST_HASH_MAX_BYTES", 64)
    rows = _listing_in_time(LoraManager(root))
    assert rows["good.safetensors"]["ok"] and rows["good.safetensors"]["sha256"] is None  # listed, not hashed


def test_ui_lock_is_not_held_while_listing_reads_files(folder):
    """A slow listing for one model type does not block a cached read for another."""
    from ui.context import UIContext

    root, _ = folder
    gate = threading.Event()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ui"))
    from engine.port import LoraView
    from fake_engine import FakeEngine

    class SlowEngine(FakeEngine):
        def loras(self, model_type, refresh=False):
            if model_type == "slow":
                gate.wait(10)
            return [LoraView("good.safetensors")]

    ctx = UIContext(SlowEngine(root.parent))
    ctx.loras("fast")
    t = threading.Thread(target=ctx.loras, args=("slow",), daemon=True)
    t.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    assert ctx.loras("fast")[0].file == "good.safetensors"
    assert time.perf_counter() - t0 < 1.0
    gate.set()
    t.join(10)
