"""Server-side checks the UI and API share: client-named LoRAs and presets are checked against the
server's own lists; presets with missing or changed files load with those rows marked."""
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.catalog import get_spec
from engine.presets import Preset
from engine.types import LoraEntry, RequestError, Stack
from ui.context import UIContext

SPEC = get_spec("demo-wan2.1-t2v-1.3b")
LORAS = [
    {"file": "demo/a.safetensors", "sha256": "aa", "compatible": True},
    {"file": "demo/b.safetensors", "sha256": "bb", "compatible": True},
    {"file": "demo/big.safetensors", "sha256": "cc", "compatible": False, "reason": "made for Wan 14B"},
]


@dataclass
class Settings:
    presets_dir: Path
    loras_dir: Path = Path("loras")


@dataclass
class FakeEngine:
    """Only the facade calls UIContext makes; no torch."""

    settings: Settings
    checked: list = field(default_factory=list)

    def list_loras(self, model_type):
        return LORAS

    def check_stack(self, model_type, stack):
        self.checked.append(stack)
        return []


@pytest.fixture
def ctx(tmp_path):
    return UIContext(FakeEngine(Settings(tmp_path / "presets")))


def test_check_stack_refuses_unknown_paths_incompatible_and_over_cap(ctx):
    ctx.check_stack(SPEC, Stack((LoraEntry("demo/a.safetensors"),)))
    assert len(ctx.engine.checked) == 1  # the engine's own check runs too
    for file, message in [("../../etc/passwd", "unknown LoRA '../../etc/passwd'"),
                          ("/abs/demo/a.safetensors", "unknown LoRA"),
                          ("demo/big.safetensors", "made for Wan 14B")]:
        with pytest.raises(RequestError, match=message):
            ctx.check_stack(SPEC, Stack((LoraEntry(file),)))
    four = Stack(tuple(LoraEntry(f) for f in ["demo/a.safetensors", "demo/b.safetensors"] * 2))
    with pytest.raises(RequestError, match="LoRA cap reached"):
        ctx.check_stack(SPEC, four)


def test_preset_with_missing_and_changed_files_loads_marked(ctx):
    ctx.store.save(Preset("Mixed", SPEC.type, [
        {"file": "demo/a.safetensors", "weight": 0.5, "sha256": "aa"},
        {"file": "demo/gone.safetensors", "weight": 1.0},
        {"file": "demo/b.safetensors", "weight": 1.0, "sha256": "old"},
    ]))
    rows, notes = ctx.preset_rows("Mixed", SPEC)
    assert [r["status"] for r in rows] == ["ok", "missing", "changed"]
    assert len(rows) == 3 and rows[1]["weight"] == 1.0
    assert any("gone.safetensors" in n for n in notes) and any("changed" in n for n in notes)
    with pytest.raises(RequestError, match="not found"):
        ctx.preset_rows("../presets/mixed", SPEC)


def test_stack_from_text_takes_json_or_a_known_preset_name(ctx):
    assert ctx.stack_from_text("", SPEC).entries == ()
    stack = ctx.stack_from_text(json.dumps([{"file": "demo/a.safetensors", "weight": 0.3}]), SPEC)
    assert stack.entries[0].weight == 0.3
    ctx.store.save(Preset("Good", SPEC.type, [{"file": "demo/b.safetensors", "weight": 2.0}]))
    assert ctx.stack_from_text("Good", SPEC).entries[0].file == "demo/b.safetensors"
    with pytest.raises(RequestError, match="neither JSON nor a saved preset"):
        ctx.stack_from_text("../../etc/passwd", SPEC)
    with pytest.raises(RequestError, match="not valid JSON"):
        ctx.stack_from_text("[{oops", SPEC)
    ctx.store.save(Preset("Broken", SPEC.type, [{"file": "demo/gone.safetensors", "weight": 1.0}]))
    with pytest.raises(RequestError, match="not in the folder"):
        ctx.stack_from_text("Broken", SPEC)
