"""The stack row's schedule field: a compact `1:0.8:0.5` text next to the weight, and a small plot of the curve.

A row's weight is a number (the slider and the number box) or a schedule (a list of values spread evenly
over the steps the entry acts on; see the README's "Weight schedules"). Typing a schedule here makes the
row scheduled; moving the slider or typing a number makes it constant again and clears this field.
Gradio only: the text is read with engine.types' own parser, the plot is an inline SVG.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from engine.types import WEIGHT_LIMIT, format_weight, parse_weight

PRIVATE = dict(api_visibility="private", queue=False, show_progress="hidden")


def build(i: int) -> tuple[Any, Any]:
    """The field and its plot, made inside the row's main line (next to the slider)."""
    text = gr.Textbox(value="", placeholder="schedule e.g. 1:0.8:0.5", label=f"LoRA {i + 1} weight schedule",
                      show_label=False, container=False, scale=2, min_width=110, max_lines=1,
                      elem_id=f"lora-schedule-{i}", elem_classes="lora-schedule")
    curve = gr.HTML("", elem_id=f"lora-curve-{i}", elem_classes="lora-curve")
    return text, curve


def first_value(weight: Any) -> float:
    """What the slider and the number box show for a weight: the number, or a schedule's first value."""
    if isinstance(weight, (list, tuple)):
        return float(weight[0]) if weight else 1.0
    return 1.0 if weight is None else float(weight)


def is_schedule(weight: Any) -> bool:
    return isinstance(weight, (list, tuple)) and len(weight) > 1


def curve_svg(values: list[float], width: int = 96, height: int = 26) -> str:
    """A step plot of a schedule (each value holds for an equal share of the steps); '' for a constant."""
    if not values or len(values) < 2:
        return ""
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    span = (hi - lo) or 1.0
    pad = 2

    def y(v: float) -> float:
        return round(pad + (hi - v) / span * (height - 2 * pad), 2)

    step = width / len(values)
    points = []
    for k, v in enumerate(values):
        points += [f"{round(k * step, 2)},{y(v)}", f"{round((k + 1) * step, 2)},{y(v)}"]
    zero = y(0.0)
    label = " → ".join(f"{v:g}" for v in values)
    return (f'<svg class="lora-curve-plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="weight schedule {label}"><title>weight over the steps: {label}</title>'
            f'<line x1="0" y1="{zero}" x2="{width}" y2="{zero}" stroke="currentColor" stroke-opacity="0.25"/>'
            f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{" ".join(points)}"/></svg>')


def render(row: dict | None) -> list:
    """Updates for (field, plot) from a row dict (a preset's list weight shows as text and a curve)."""
    w = (row or {}).get("weight", 1.0)
    if is_schedule(w):
        return [gr.update(value=format_weight(w)), gr.update(value=curve_svg([float(v) for v in w]))]
    return [gr.update(value=""), gr.update(value="")]


def parse(text: str) -> tuple[Any, str]:
    """(weight, problem): None weight for an empty field; the problem names the bad value and the fix."""
    text = (text or "").strip()
    if not text:
        return None, ""
    try:
        w = parse_weight(text, "schedule")
    except ValueError as e:
        return None, str(e)
    values = list(w) if isinstance(w, tuple) else [w]
    bad = [v for v in values if not abs(v) <= WEIGHT_LIMIT]
    if bad:
        return None, f"schedule {text!r}: {bad[0]:g} is outside [-{WEIGHT_LIMIT:g}, {WEIGHT_LIMIT:g}]"
    return (values if len(values) > 1 else values[0]), ""


def wire_row(i: int, row: Any, rows_state: Any, message: Any) -> None:
    """Entering a schedule (Enter or leaving the field) sets the row's weight to the list (slider and box show its first value);
    moving the slider or typing a number clears the field (the row is constant again)."""

    def on_schedule(rows, text):
        rows = [dict(r) for r in rows]
        if i >= len(rows):
            return rows, gr.update(), gr.update(), gr.update(), gr.update(), ""
        weight, problem = parse(text)
        if problem:  # the text stays for the user to fix; the row keeps its weight
            return rows, gr.update(), gr.update(), gr.update(), gr.update(), f"LoRA row {i + 1}: {problem}"
        if weight is None:  # emptied: back to the constant the slider shows
            weight = first_value(rows[i].get("weight", 1.0))
        rows[i]["weight"] = weight
        first = first_value(weight)
        return (rows, gr.update(), gr.update(value=curve_svg(weight) if is_schedule(weight) else ""),
                gr.update(value=max(-2.0, min(2.0, first))), gr.update(value=first), "")

    def clear(_value):
        return gr.update(value=""), gr.update(value="")

    # submit / blur, not change: a programmatic update (render, the clear below) must not write the row back
    for event in (row.schedule.submit, row.schedule.blur):
        event(on_schedule, [rows_state, row.schedule],
              [rows_state, row.schedule, row.curve, row.slider, row.weight, message], **PRIVATE)
    row.slider.input(clear, [row.slider], [row.schedule, row.curve], **PRIVATE)
    row.weight.input(clear, [row.weight], [row.schedule, row.curve], **PRIVATE)
