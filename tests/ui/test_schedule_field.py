"""The stack row's schedule field: parsing, the curve, rendering a preset's list weight, and the page wiring."""
from __future__ import annotations

import pytest

from engine.port import LoraView
from engine.types import LoraEntry
from fake_engine import A14B, FakeEngine
from ui import schedule_field as sf
from ui import stack_logic as sl


def test_parse_and_first_value():
    assert sf.parse("1:0.8:0.5") == ([1.0, 0.8, 0.5], "")
    assert sf.parse(" 0.7 ") == (0.7, "")
    assert sf.parse("") == (None, "")
    w, problem = sf.parse("1:x")
    assert w is None and "'x' is not a number" in problem
    w, problem = sf.parse("1:12")
    assert w is None and "outside [-10, 10]" in problem
    assert sf.first_value([0.4, 1.0]) == 0.4 and sf.first_value(0.3) == 0.3 and sf.first_value(None) == 1.0


def test_curve_is_a_step_plot_of_the_values():
    svg = sf.curve_svg([1.0, 0.5, 0.0])
    assert svg.startswith("<svg") and "1 → 0.5 → 0" in svg
    pts = svg.split('points="')[1].split('"')[0].split()
    assert len(pts) == 6  # two points per value: each holds for an equal share of the steps
    ys = [float(p.split(",")[1]) for p in pts]
    assert ys[0] == ys[1] < ys[2] == ys[3] < ys[4] == ys[5]  # higher value, higher on the plot
    assert sf.curve_svg([0.7]) == "" and sf.curve_svg([]) == ""


def test_render_shows_a_preset_schedule_and_the_row_still_makes_a_stack():
    row = {"file": "a.safetensors", "weight": [1.0, 0.5], "applies_to": "both", "low_noise_weight": None, "enabled": True}
    text, curve = sf.render(row)
    assert text["value"] == "1:0.5" and curve["value"].startswith("<svg")
    assert sf.render({**row, "weight": 0.8})[0]["value"] == ""
    stack = sl.to_stack([row])
    assert stack.entries[0] == LoraEntry("a.safetensors", weight=(1.0, 0.5))


@pytest.mark.slow
def test_page_builds_with_a_schedule_field_per_row_and_its_handler_sets_the_row(tmp_path):
    from ui.layout import build_ui

    loras = [LoraView(file="a.safetensors", compatible=True, reason="", ok=True)]
    demo = build_ui(FakeEngine(tmp_path, models=[(A14B, A14B)], loras=loras), max_rows=2)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"lora-schedule-0", "lora-curve-0", "lora-schedule-1"} <= ids
    fns = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_schedule"]
    assert len(fns) == 2 * 2  # submit and blur, per row
    on_schedule = fns[0].fn
    rows = [sl.new_row("a.safetensors")]
    out = on_schedule(rows, "1:0.25")
    assert out[0][0]["weight"] == [1.0, 0.25] and out[2]["value"].startswith("<svg") and out[4]["value"] == 1.0
    out = on_schedule(out[0], "")  # emptied: constant again at the value the slider shows
    assert out[0][0]["weight"] == 1.0 and out[2]["value"] == ""
    out = on_schedule(rows, "1:oops")
    assert out[0][0]["weight"] == 1.0 and "LoRA row 1" in out[5]


def test_run_report_shows_a_scheduled_entry_and_its_cost():
    from engine.port import StackReport
    from ui.run_view import report_markdown

    report = StackReport.from_rows([
        {"file": "speed.safetensors", "status": "applied", "mode": "runtime", "weights": {"single": [1.0, 0.5]},
         "mode_note": "weight schedule: runs unmerged through forward hooks, about 2.1% more linear-layer FLOPs",
         "coverage": {"applied": 4, "total": 4}, "coverage_by_expert": {"single": {"applied": 4, "total": 4}}},
        {"file": "style.safetensors", "status": "applied", "mode": "merged", "weights": {"single": 0.8},
         "coverage": {"applied": 4, "total": 4}, "coverage_by_expert": {"single": {"applied": 4, "total": 4}}},
    ], ("single",))
    text = report_markdown(report)
    assert "`speed.safetensors` × 1:0.5" in text and "2.1% more" in text
    assert "`style.safetensors` × 0.8" in text
