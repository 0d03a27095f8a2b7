"""Stack editor rules: per-expert cap counts and refusals, pair offers, row moves, typed weights."""
import pytest

from engine.models.catalog import get_spec, with_lora_cap
from engine.lora.planning import cap_problem
from engine.types import RequestError
from ui import stack_logic as sl

A14B = with_lora_cap(get_spec("wan2.2-t2v-a14b"), {})  # cap 2 per expert
SINGLE = get_spec("demo-wan2.1-t2v-1.3b")  # cap 3
SPECS = {A14B.type: A14B, SINGLE.type: SINGLE}


def cap(model_type, stack):
    """The engine's one cap rule, as EnginePort.cap_problem gives it."""
    return cap_problem(SPECS[model_type], stack)


def rows(*specs):
    return [sl.new_row(f, applies_to=a) for f, a in specs]


def test_cap_text_counts_each_expert():
    r = rows(("a", "both"), ("b", "high_noise"))
    assert sl.cap_text(r, A14B) == "2/2 on high-noise expert · 1/2 on low-noise expert"
    r[1]["enabled"] = False
    assert sl.cap_text(r, A14B) == "1/2 on high-noise expert · 1/2 on low-noise expert"
    assert sl.cap_text(rows(("a", "both"), ("", "both")), SINGLE) == "1/3 on model"


def test_over_cap_message_names_expert_and_flag():
    msg = sl.over_cap(rows(("a", "both"), ("b", "both"), ("c", "high_noise")), A14B, cap)
    assert "high-noise expert" in msg and "--lora-cap wan2.2-t2v-a14b=3" in msg
    assert sl.over_cap(rows(("a", "high_noise"), ("b", "high_noise"), ("c", "low_noise")), A14B, cap) is None


def test_can_add_routes_to_free_expert_then_refuses():
    full_high = rows(("a", "high_noise"), ("b", "high_noise"))
    assert sl.can_add(full_high, A14B, 6, cap) is None
    assert sl.default_applies_to(full_high, A14B) == "low_noise"
    full = full_high + rows(("c", "low_noise"), ("d", "low_noise"))
    assert "LoRA cap reached" in sl.can_add(full, A14B, 6, cap)
    three = rows(("a", "both"), ("b", "both"), ("c", "both"))
    assert "--lora-cap demo-wan2.1-t2v-1.3b=4" in sl.can_add(three, SINGLE, 6, cap)
    assert "holds 2 rows" in sl.can_add(rows(("a", "both"), ("", "both")), SINGLE, 2, cap)


def test_pair_partner_matches_case_and_prefers_file_name():
    files = ["speed/high/lightx2v_HIGH.safetensors", "speed/high/lightx2v_LOW.safetensors", "x_high_noise.safetensors",
             "x_low_noise.safetensors"]
    assert sl.pair_partner("speed/high/lightx2v_HIGH.safetensors", files) == "speed/high/lightx2v_LOW.safetensors"
    assert sl.pair_partner("x_high_noise.safetensors", files) == "x_low_noise.safetensors"
    assert sl.pair_partner("x_low_noise.safetensors", files) == "x_high_noise.safetensors"  # both ways
    assert sl.pair_partner("lonely_high.safetensors", files) is None


def test_move_and_to_stack():
    r = rows(("a", "both"), ("b", "both"), ("c", "both"))
    assert [x["file"] for x in sl.move(r, 0, 1)] == ["b", "a", "c"]
    assert [x["file"] for x in sl.move(r, 0, -1)] == ["a", "b", "c"]
    r[1]["weight"] = 7.5  # typed beyond the slider
    stack = sl.to_stack(r + [sl.new_row("")])
    assert [e.file for e in stack.entries] == ["a", "b", "c"] and stack.entries[1].weight == 7.5
    r[2]["weight"] = 12
    with pytest.raises(RequestError, match="LoRA row 3"):
        sl.to_stack(r)
    assert sl.clamp_slider(7.5) == 2.0 and sl.clamp_slider(-3) == -2.0


def test_gauge_formats_samples_and_missing_gpu():
    from engine.port import MemoryView
    from ui.run_view import gauge_html

    gib = 1 << 30
    text = gauge_html(MemoryView(3 * gib, 24 * gib, 5 * gib, 16 * gib, 4 * gib, 2 * gib), final=True)
    assert "after the run" in text and "3.00 / 24.0 GiB (peak 4.00)" in text and "(app peak 2.00)" in text
    text = gauge_html(MemoryView(ram_used_bytes=4 * gib, ram_total_bytes=16 * gib, reason="no NVIDIA driver"))
    assert "VRAM: not available" in text and "no NVIDIA driver" in text and "4.00 / 16.0 GiB" in text
    assert "1.00 / 8.0 GiB" in gauge_html(MemoryView(vram_used_bytes=gib, vram_total_bytes=8 * gib))


def test_stack_report_is_split_per_expert():
    from engine.port import StackReport
    from ui.run_view import report_markdown

    rows = [{"file": "speed_high.safetensors", "status": "applied", "weights": {"high_noise": 1.0, "low_noise": 0.0},
             "coverage_by_expert": {"high_noise": {"applied": 40, "total": 40}}},
            {"file": "style.safetensors", "status": "applied", "weights": {"high_noise": 0.5, "low_noise": 0.8},
             "coverage_by_expert": {"high_noise": {"applied": 30, "total": 40}, "low_noise": {"applied": 30, "total": 40}}},
            {"file": "off.safetensors", "status": "disabled"}]
    text = report_markdown(StackReport.from_rows(rows, ("high_noise", "low_noise")))
    high, low = text.split("**Low-noise expert:**")
    assert "**High-noise expert:** 2 LoRAs" in high and "speed_high.safetensors` × 1 · 40/40 keys applied" in high
    assert " 1 LoRA\n" in low and "style.safetensors` × 0.8 · 30/40 keys applied" in low
    assert "speed_high" not in low and "`off.safetensors` disabled" in low


def test_count_text_takes_counts_or_key_lists():
    assert sl.count_text({"applied": 40, "total": 40, "skipped": [], "unmatched": []}, "applied") == "40/40 keys applied"
    text = sl.count_text({"applied": 38, "skipped": ["a", "b"], "unmatched": 1}, "match this model")
    assert text == "38/41 keys match this model (2 skipped, 1 unmatched)"


def test_plan_reasons_read_as_sentences():
    from engine.port import PlanView
    from ui.run_view import plan_markdown

    text = plan_markdown(PlanView("none", reasons=("needs 3.1 GiB of RAM, 5.0 GiB available: fits",
                                                   "The CPU computes in fp32 and is very slow.")))
    assert "available: fits. The CPU computes" in text and "Needs 3.1 GiB" in text
