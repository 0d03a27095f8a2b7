"""Fuzzing LoRA files: mutated bytes, headers, metadata, shapes, dtypes, offsets and alphas of valid small
LoRAs. The only allowed outcomes are a valid parse (which then applies to a tiny model or is refused with a
LoRA error) or a LoraFormatError that names the file."""
from __future__ import annotations

import json
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine" / "lora"))
from lora_factory import lightx2v_diffs, random_lowrank, tiny_transformer, write_lightx2v, write_lora  # noqa: E402

from engine.models.catalog import get_spec  # noqa: E402
from engine.lora.errors import LoraFormatError, LoraIncompatibleError  # noqa: E402
from engine.lora.files import read_lora_file, read_lora_shapes  # noqa: E402
from engine.lora.formats import MAIN, parse_lora  # noqa: E402
from engine.lora.inspection import coverage, describe, lora_width  # noqa: E402
from engine.lora.manager import LoraManager  # noqa: E402
from engine.types import LoraEntry, Stack  # noqa: E402

EXAMPLES = 150  # per strategy; 5 strategies
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
COUNTS = {"examples": 0, "valid": 0, "format_error": 0}


@pytest.fixture(scope="module")
def world():
    """Valid seed LoRAs of four families for a tiny 1.3B-shaped model, the model, and a scratch folder."""
    root = Path(tempfile.mkdtemp(prefix="wanstack-fuzz-"))
    model = tiny_transformer(width=16, layers=1)
    lowrank = random_lowrank(model, rank=2, targets=["blocks.0.attn1.to_q", "blocks.0.ffn.net.0.proj"])
    seeds = {
        "peft": write_lora(root / "seed-peft.safetensors", "peft", lowrank),
        "wan": write_lora(root / "seed-wan.safetensors", "wan", lowrank, alpha=1.0),
        "kohya": write_lora(root / "seed-kohya.safetensors", "kohya", lowrank, alpha=2.0),
        "diff": write_lightx2v(root / "seed-diff.safetensors",
                               {k: v for k, v in lightx2v_diffs(model).items() if k.startswith("blocks.0.attn1")}),
    }
    shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
    yield {"root": root, "model": model, "seeds": {k: p.read_bytes() for k, p in seeds.items()}, "shapes": shapes,
           "manager": LoraManager(root), "spec": get_spec("demo-wan2.1-t2v-1.3b")}


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header, data: bytes, pad: bool = True) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def check(world, raw: bytes, name: str = "fuzzed.safetensors") -> str:
    """Run every reader on `raw` written as a LoRA file; return the outcome or fail on anything else."""
    path = world["root"] / name
    path.write_bytes(raw)
    COUNTS["examples"] += 1
    try:
        parsed = parse_lora(read_lora_shapes(path))
        describe(parsed, path.name)
        lora_width(parsed)
        full = parse_lora(read_lora_file(path))
        coverage(full, MAIN, world["shapes"])
    except LoraFormatError as e:
        assert path.name in str(e), f"error does not name the file: {e}"
        COUNTS["format_error"] += 1
        return "format_error"
    COUNTS["valid"] += 1
    manager, model = world["manager"], world["model"]
    manager.loras_dir = path.parent
    try:
        manager.apply({"single": model}, world["spec"], Stack((LoraEntry(file=str(path), weight=0.5),)), resolve=Path)
        manager.remove({"single": model})
    except (LoraFormatError, LoraIncompatibleError) as e:
        assert path.name in str(e), f"error does not name the file: {e}"
        manager.remove({"single": model})
    return "valid"


FAMILIES = st.sampled_from(["peft", "wan", "kohya", "diff"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4), max_leaves=12)


@FUZZ
@given(family=FAMILIES, data=st.data())
def test_fuzz_bytes(world, family, data):
    raw = bytearray(world["seeds"][family])
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "truncate":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del raw[pos:pos + data.draw(st.integers(1, 16))]
    check(world, bytes(raw))


@FUZZ
@given(family=FAMILIES, data=st.data())
def test_fuzz_header_fields(world, family, data):
    header, blob = split(world["seeds"][family])
    keys = [k for k in header if k != "__metadata__"]
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(keys))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "drop", "extra"]))
        if not isinstance(header[key], dict):
            field = "entry"
        if field == "dtype":
            header[key]["dtype"] = data.draw(st.sampled_from(
                ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "I64", "F8_E4M3", "X9", "", "f32"]) | JSON_VALUES)
        elif field == "shape":
            header[key]["shape"] = data.draw(
                st.lists(st.integers(-3, 40) | st.sampled_from([0, 2**31, 2**40, 2**64]), max_size=5) | JSON_VALUES)
        elif field == "data_offsets":
            header[key]["data_offsets"] = data.draw(
                st.lists(st.integers(-10, len(blob) + 64) | st.sampled_from([2**63, 2**64]), min_size=0, max_size=3)
                | JSON_VALUES)
        elif field == "entry":
            header[key] = data.draw(JSON_VALUES)
        elif field == "drop":
            header[key].pop(data.draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        else:
            header[key][data.draw(st.text(max_size=5))] = data.draw(JSON_VALUES)
    check(world, join(header, blob))


@FUZZ
@given(family=FAMILIES, meta=JSON_VALUES, depth=st.integers(0, 200_000))
def test_fuzz_metadata_and_nesting(world, family, meta, depth):
    header, blob = split(world["seeds"][family])
    header["__metadata__"] = meta
    text = json.dumps(header).encode()
    if depth > 1000:  # a deeply nested value somewhere in the header
        text = text[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    check(world, join(text, blob))


@FUZZ
@given(family=st.sampled_from(["wan", "kohya", "peft"]), data=st.data())
def test_fuzz_alpha_and_rank(world, family, data):
    """Alphas of any shape and value (empty, NaN, 0, huge), rank-0 and 1-D factors, 1-D diffs."""
    from safetensors.torch import load_file, save_file

    path = world["root"] / "seed.safetensors"
    path.write_bytes(world["seeds"][family])
    sd = load_file(str(path))
    factors = [k for k in sd if k.endswith((".weight",))]
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["alpha", "rank0", "flat", "diff1d", "scalar"]))
        key = data.draw(st.sampled_from(factors))
        base = key.rsplit(".", 2)[0] if ".lora_" in key else key.rsplit(".", 1)[0]
        if what == "alpha":
            shape = data.draw(st.sampled_from([(), (0,), (1,), (2,), (1, 1)]))
            value = data.draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
            sd[base + ".alpha"] = torch.full(shape, value)
        elif what == "rank0":
            sd[key] = torch.zeros((0, *sd[key].shape[1:]))
        elif what == "flat":
            sd[key] = sd[key].reshape(-1)
        elif what == "diff1d":
            sd[base + ".diff"] = torch.randn(data.draw(st.integers(1, 600)))
        else:
            sd[key] = torch.tensor(1.0)
    save_file(sd, str(path))
    check(world, path.read_bytes())


@FUZZ
@given(family=FAMILIES, data=st.data())
def test_fuzz_offsets_overlap_and_gaps(world, family, data):
    """Tensors that share, swap or skip bytes of the data area; data shorter or longer than declared."""
    header, blob = split(world["seeds"][family])
    keys = [k for k in header if k != "__metadata__"]
    a, b = data.draw(st.sampled_from(keys)), data.draw(st.sampled_from(keys))
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    cut = data.draw(st.integers(-64, 64))
    blob = blob[:cut] if cut < 0 else blob + b"\0" * cut
    check(world, join(header, blob, pad=data.draw(st.booleans())))


def test_fuzz_counts_are_reported(world):
    """Runs last in this module: every example ended in one of the two allowed outcomes."""
    out = Path(__file__).resolve().parents[2] / "test-artifacts" / "reliability"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps(COUNTS))
    if COUNTS["examples"]:
        assert COUNTS["examples"] == COUNTS["valid"] + COUNTS["format_error"]
        assert COUNTS["format_error"] > 0 and COUNTS["valid"] > 0
