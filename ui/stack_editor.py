"""The LoRA stack editor: a fixed set of rows shown or hidden, driven by a list-of-dicts state.

Rows are pre-built (not re-rendered) so an edit is one small server round trip.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine.port import LoraView, ModelSpec
from engine.types import WanStackError
from ui import schedule_field
from ui import stack_logic as sl
from ui.context import UIContext

log = logging.getLogger(__name__)
PRIVATE = dict(api_visibility="private", queue=False, show_progress="hidden")
ROW_UPDATES = 11  # what render() updates per row: Row.components()
APPLIES = [("acts on both experts", "both"), ("acts on high-noise only", "high_noise"),
           ("acts on low-noise only", "low_noise")]


@dataclass
class Row:
    box: Any
    file: Any
    slider: Any
    weight: Any
    enabled: Any
    up: Any
    down: Any
    remove: Any
    applies_to: Any
    low_weight: Any
    info: Any
    triggers: Any
    schedule: Any = None  # ui/schedule_field.py (issue 11): the weight schedule text and its curve
    curve: Any = None

    def components(self) -> list:
        return [self.box, self.file, self.slider, self.weight, self.enabled, self.applies_to, self.low_weight,
                self.info, self.triggers, self.schedule, self.curve]


class StackEditor:
    def __init__(self, ctx: UIContext):
        self.ctx = ctx
        self.rows: list[Row] = []

    # ---- layout -------------------------------------------------------------------------
    def build(self, spec: ModelSpec | None = None):
        """`spec`: the model picked when the page opens, so the page is complete without a load event."""
        cap = sl.cap_text([], spec) if spec else ""
        note = self.render([], spec)[3] if spec else ""
        with gr.Group(elem_id="stack-editor"):
            with gr.Row(elem_classes="stack-head"):
                gr.Markdown("**LoRA stack** · merged into the weights in this order (slider -2…2, type up to ±10)",
                            elem_classes="stack-title")
                self.cap = gr.Markdown(cap, elem_id="cap-indicator", elem_classes="cap")
            for i in range(self.ctx.max_rows):
                self.rows.append(self._build_row(i))
            self.message = gr.Markdown("", elem_id="stack-message", elem_classes="stack-message")
            with gr.Row(elem_classes="stack-buttons"):
                self.add = gr.Button("+ Add LoRA", size="sm", elem_id="add-lora", scale=2)
                self.pair = gr.Button("", size="sm", visible=False, elem_id="add-pair", scale=3)
                self.refresh = gr.Button("↻ Rescan folder", size="sm", elem_id="refresh-loras", scale=1)
            self.unavailable = gr.Markdown(note, elem_id="lora-unavailable", elem_classes="small-note")

    def _build_row(self, i: int) -> Row:
        with gr.Column(visible=False, elem_classes="lora-row", elem_id=f"lora-row-{i}") as box:
            with gr.Row(equal_height=True, elem_classes="row-main"):
                file = gr.Dropdown(choices=[], value=None, label=f"LoRA {i + 1}", show_label=False, container=False,
                                   scale=6, min_width=200, elem_id=f"lora-file-{i}")
                slider = gr.Slider(-2, 2, value=1.0, step=0.05, label=f"LoRA {i + 1} weight slider", show_label=False,
                                   container=False, scale=4, min_width=140, elem_id=f"lora-slider-{i}", buttons=[],
                                   elem_classes="lora-slider")
                weight = gr.Number(value=1.0, minimum=-10, maximum=10, step=0.05, label=f"LoRA {i + 1} weight",
                                   show_label=False, container=False, scale=0, min_width=72, elem_id=f"lora-weight-{i}",
                                   elem_classes="lora-weight")
                enabled = gr.Checkbox(value=True, label="on", container=False, scale=0, min_width=52,
                                      elem_id=f"lora-enabled-{i}")
            with gr.Row(equal_height=True, elem_classes="row-detail"):
                applies_to = gr.Dropdown(APPLIES, value="both", label=f"LoRA {i + 1} acts on", show_label=False,
                                         container=False, scale=0, min_width=180, elem_id=f"lora-applies-{i}")
                low_weight = gr.Number(value=None, minimum=-10, maximum=10, step=0.05,
                                       label=f"LoRA {i + 1} weight on the low-noise expert", show_label=False,
                                       container=False, placeholder="low-noise weight: same", scale=0,
                                       min_width=150, elem_id=f"lora-lowweight-{i}")
                # the weight schedule (issue 11) sits on this line: the main line keeps the slider's ends visible
                schedule, curve = schedule_field.build(i)
                triggers = gr.Button("+ trigger words", size="sm", scale=0, min_width=110, visible=False,
                                     elem_id=f"lora-triggers-{i}")
                up = gr.Button("Up", size="sm", scale=0, min_width=46, elem_id=f"lora-up-{i}")
                down = gr.Button("Down", size="sm", scale=0, min_width=56, elem_id=f"lora-down-{i}")
                remove = gr.Button("Remove", size="sm", scale=0, min_width=70, variant="stop", elem_id=f"lora-remove-{i}")
            info = gr.Markdown("", elem_classes="row-info", elem_id=f"lora-info-{i}")
        return Row(box, file, slider, weight, enabled, up, down, remove, applies_to, low_weight, info, triggers,
                   schedule, curve)

    def outputs(self) -> list:
        """Everything `render()` updates, in its order."""
        comps = [self.cap, self.message, self.pair, self.unavailable]
        for row in self.rows:
            comps += row.components()
        return comps

    # ---- rendering ----------------------------------------------------------------------
    def render(self, rows: list[dict], spec: ModelSpec | None, message: str = "", report: dict | None = None,
               pair: dict | None = None, only: range | set | None = None) -> list:
        """Updates for `outputs()`. With `only`, rows outside it and the folder note are left untouched
        (an empty update), which keeps small edits cheap."""
        if spec is None:
            return [gr.update(value="pick a model"), message, gr.update(visible=False), ""] + \
                [gr.update(visible=False)] * (len(self.rows) * ROW_UPDATES)
        loras = self.ctx.loras(spec.type)
        choices = [v.file for v in loras if v.compatible]
        blocked = [v for v in loras if not v.compatible]
        note = ""
        if blocked:
            items = "".join(f"<li><code>{v.file}</code>: {v.reason}</li>" for v in blocked)
            note = (f"<details><summary>{len(blocked)} file{'s' if len(blocked) > 1 else ''} in the LoRA folder "
                    f"not offered for this model (why)</summary><ul>{items}</ul></details>")
        elif not loras:
            note = f"No LoRA files in `{self.ctx.engine.loras_dir}`. Put .safetensors files there and rescan."
        pair_update = gr.update(visible=bool(pair), value=f"+ add its partner {pair['file']} on the {pair['expert'].replace('_', '-')} expert" if pair else "")
        out = [sl.cap_text(rows, spec), message, pair_update, note if only is None else gr.update()]
        for i, row in enumerate(self.rows):
            if only is not None and i not in only:
                out += [gr.update()] * ROW_UPDATES
                continue
            if i >= len(rows):
                out += [gr.update(visible=False)] + [gr.update()] * (ROW_UPDATES - 1)
                continue
            r = rows[i]
            info = self.ctx.lora_info(spec.type, r["file"]) if r.get("file") else None
            row_choices = choices if not r.get("file") or r["file"] in choices else choices + [r["file"]]
            out += [
                gr.update(visible=True),
                gr.update(choices=row_choices, value=r.get("file") or None),
                gr.update(value=sl.clamp_slider(schedule_field.first_value(r.get("weight", 1.0)))),
                gr.update(value=schedule_field.first_value(r.get("weight", 1.0))),
                gr.update(value=bool(r.get("enabled", True))),
                gr.update(value=r.get("applies_to") or "both", visible=spec.dual_expert),
                gr.update(value=r.get("low_noise_weight"), visible=spec.dual_expert),
                gr.update(value=self.describe(r, info, spec, (report or {}).get(r.get("file")),
                                              self.ctx.coverage(spec.type, r["file"]) if info else None)),
                gr.update(visible=bool(info and info.trigger_words)),
                *schedule_field.render(r),
            ]
        return out

    @staticmethod
    def describe(row: dict, info: LoraView | None, spec: ModelSpec, applied: dict | None,
                 predicted: dict | None = None) -> str:
        """One line of inspection for a row: status, rank, family, coverage, triggers, size, memory."""
        if not row.get("file"):
            return "pick a LoRA file"
        if row.get("status") == "missing" or info is None:
            return f"⚠ **missing**: `{row['file']}` is not in the LoRA folder (kept from the preset)"
        parts = []
        if row.get("status") == "changed":
            parts.append("⚠ **changed** since the preset was saved")
        if not info.compatible:
            parts.append(f"⚠ **incompatible**: {info.reason}")
        if info.rank:
            parts.append(f"rank {info.rank}")
        if info.family:
            parts.append(info.family)
        if applied:
            parts.append(_coverage(applied))
        elif predicted:
            parts.append(sl.count_text(predicted, "match this model"))
        if info.trigger_words:
            parts.append("triggers: " + ", ".join(info.trigger_words[:4]))
        if info.format:
            parts.append(info.format)
        if info.size_bytes:
            # merged into the weights: memory only while applying, nothing extra per step
            apply_bytes = info.apply_memory_bytes or info.size_bytes
            parts.append(f"{sl.human_bytes(info.size_bytes)} · +{sl.human_bytes(apply_bytes)} to apply, 0 per step")
        if spec.dual_expert and info.expert:
            parts.append(f"made for the {info.expert.replace('_', '-')} expert")
        elif spec.dual_expert and info.two_expert:
            parts.append("holds both experts")
        return " · ".join(parts)


def _coverage(applied: dict) -> str:
    """After a run: the engine's per-entry report."""
    cov = applied.get("coverage")
    if isinstance(cov, dict):
        text = sl.count_text(cov, "applied")
    elif cov:
        text = str(cov)
    else:
        text = str(applied.get("status", ""))
    return f"**{text}**"


def wire(editor: StackEditor, model: Any, rows_state: Any, report_state: Any, pair_state: Any, prompt: Any) -> None:
    """Connect the editor's events. Light handlers only touch the row they belong to."""
    ctx = editor.ctx
    full = [rows_state, pair_state] + editor.outputs()

    def spec_of(model_id):
        try:
            return ctx.spec_for(model_id) if model_id else None
        except WanStackError as e:  # an unknown model id just means "no model picked"
            log.debug("no spec for %r: %s", model_id, e)
            return None

    def redraw(model_id, rows, report, message="", pair=None, only=None):
        spec = spec_of(model_id)
        return [rows, pair] + editor.render(rows, spec, message, report, pair, only)

    def on_add(model_id, rows, report):
        spec = spec_of(model_id)
        if spec is None:
            return redraw(model_id, rows, report, "pick a model first")
        reason = sl.can_add(rows, spec, ctx.max_rows, ctx.engine.cap_problem)
        if reason:
            return redraw(model_id, rows, report, reason, only=set())
        new = rows + [sl.new_row(applies_to=sl.default_applies_to(rows, spec))]
        return redraw(model_id, new, report, only={len(rows)})

    def on_refresh(model_id, rows, report):
        spec = spec_of(model_id)
        if spec is not None:
            ctx.loras(spec.type, refresh=True)
        return redraw(model_id, rows, report, "")

    def on_pair(model_id, rows, report, pair):
        spec = spec_of(model_id)
        if spec is None or not pair:
            return redraw(model_id, rows, report)
        rows = [dict(r) for r in rows]
        i = pair["row"]
        own = "low_noise" if pair["expert"] == "high_noise" else "high_noise"
        if i < len(rows):
            rows[i]["applies_to"] = own
            weight = rows[i].get("weight", 1.0)
        else:
            weight = 1.0
        info = ctx.lora_info(spec.type, pair["file"])
        candidate = rows + [{**sl.new_row(pair["file"], weight, pair["expert"]), "sha256": info.sha256 if info else None}]
        reason = (sl.over_cap(candidate, spec, ctx.engine.cap_problem)
                  or (f"the editor holds {ctx.max_rows} rows" if len(candidate) > ctx.max_rows else None))
        if reason:
            return redraw(model_id, rows, report, reason)
        return redraw(model_id, candidate, report)

    editor.add.click(on_add, [model, rows_state, report_state], full, **PRIVATE)
    editor.refresh.click(on_refresh, [model, rows_state, report_state], full, **PRIVATE)
    editor.pair.click(on_pair, [model, rows_state, report_state, pair_state], full, **PRIVATE)

    for i, row in enumerate(editor.rows):
        _wire_row(i, row, editor, model, rows_state, report_state, prompt, full, spec_of, redraw)


def _wire_row(i, row: Row, editor, model, rows_state, report_state, prompt, full, spec_of, redraw):
    ctx = editor.ctx

    def on_file(model_id, rows, report, file):
        spec = spec_of(model_id)
        rows = [dict(r) for r in rows]
        if spec is None or i >= len(rows):
            return redraw(model_id, rows, report)
        if file not in ctx.compatible_files(spec.type):
            return redraw(model_id, rows, report, f"{file!r} is not a compatible LoRA in the folder; pick one from the list")
        info = ctx.lora_info(spec.type, file)
        rows[i].update(file=file, sha256=info.sha256 if info else None, status="ok", problem="")
        pair, message = None, ""
        if spec.dual_expert and info is not None and info.expert:
            # a file made for one expert acts on that expert only (and counts against that expert's cap)
            candidate = [dict(r) for r in rows]
            candidate[i]["applies_to"] = info.expert
            if sl.over_cap(candidate, spec, ctx.engine.cap_problem) is None:
                rows = candidate
            else:
                message = f"{file} is made for the {info.expert.replace('_', '-')} expert, which is full"
            partner = sl.pair_partner(file, ctx.compatible_files(spec.type))
            if partner and partner not in {r.get("file") for r in rows}:
                other = "low_noise" if info.expert == "high_noise" else "high_noise"
                pair = {"row": i, "file": partner, "expert": other}
        return redraw(model_id, rows, report, message, pair=pair, only={i})

    def on_slider(rows, value):
        rows = [dict(r) for r in rows]
        if i < len(rows):
            rows[i]["weight"] = round(float(value), 4)
        return rows, gr.update(value=rows[i]["weight"] if i < len(rows) else value)

    def on_weight(rows, value):
        rows = [dict(r) for r in rows]
        if value is None or not -10 <= float(value) <= 10:
            old = schedule_field.first_value(rows[i]["weight"]) if i < len(rows) else 1.0
            return rows, gr.update(), gr.update(value=old)  # typed outside [-10, 10]: the box goes back
        if i < len(rows):
            rows[i]["weight"] = float(value)
        return rows, gr.update(value=sl.clamp_slider(value)), gr.update()

    def on_low(rows, value):
        rows = [dict(r) for r in rows]
        if i < len(rows):
            if value is not None and not -10 <= float(value) <= 10:
                return rows, gr.update(value=rows[i].get("low_noise_weight"))
            rows[i]["low_noise_weight"] = None if value is None else float(value)
        return rows, gr.update()

    def guarded(field):
        """enable / applies_to edits: refused (and reverted) when an expert would go over the cap."""

        def handler(model_id, rows, value):
            spec = spec_of(model_id)
            rows = [dict(r) for r in rows]
            if spec is None or i >= len(rows):
                return rows, gr.update(), gr.update(), ""
            candidate = [dict(r) for r in rows]
            candidate[i][field] = value
            message = sl.over_cap(candidate, spec, ctx.engine.cap_problem)
            if message:
                return rows, gr.update(value=rows[i][field]), sl.cap_text(rows, spec), message
            return candidate, gr.update(), sl.cap_text(candidate, spec), ""

        return handler

    def on_move(delta):
        def handler(model_id, rows, report):
            return redraw(model_id, sl.move(rows, i, delta), report, only={i, i + delta})

        return handler

    def on_remove(model_id, rows, report):
        rows = [r for j, r in enumerate(rows) if j != i]
        return redraw(model_id, rows, report, only=range(i, ctx.max_rows))

    def on_triggers(model_id, rows, text):
        spec = spec_of(model_id)
        if spec is None or i >= len(rows):
            return gr.update()
        info = ctx.lora_info(spec.type, rows[i].get("file"))
        words = [w for w in (info.trigger_words if info else ()) if w not in (text or "")]
        return ", ".join([t for t in [(text or "").strip()] + words if t])

    row.file.input(on_file, [model, rows_state, report_state, row.file], full, **PRIVATE)
    row.slider.input(on_slider, [rows_state, row.slider], [rows_state, row.weight], **PRIVATE)
    row.weight.input(on_weight, [rows_state, row.weight], [rows_state, row.slider, row.weight], **PRIVATE)
    row.low_weight.input(on_low, [rows_state, row.low_weight], [rows_state, row.low_weight], **PRIVATE)
    row.enabled.input(guarded("enabled"), [model, rows_state, row.enabled],
                      [rows_state, row.enabled, editor.cap, editor.message], **PRIVATE)
    row.applies_to.input(guarded("applies_to"), [model, rows_state, row.applies_to],
                         [rows_state, row.applies_to, editor.cap, editor.message], **PRIVATE)
    row.up.click(on_move(-1), [model, rows_state, report_state], full, **PRIVATE)
    row.down.click(on_move(1), [model, rows_state, report_state], full, **PRIVATE)
    row.remove.click(on_remove, [model, rows_state, report_state], full, **PRIVATE)
    row.triggers.click(on_triggers, [model, rows_state, prompt], [prompt], **PRIVATE)
    schedule_field.wire_row(i, row, rows_state, editor.message)
