"""The Tools tab: bake the current stack into a new model, and inspect any LoRA file readably."""
from __future__ import annotations

import logging

import gradio as gr

from engine.types import WanStackError
from ui import stack_logic as sl
from ui.context import UIContext

log = logging.getLogger(__name__)
DTYPES = [("keep the stored dtype", ""), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32")]
PRIVATE = dict(api_visibility="private", queue=False, show_progress="hidden")


def inspection_markdown(info: dict) -> str:
    """The headline fields of an inspection as a small table, coverage per expert underneath."""
    rows = [
        ("format", info.get("format") or info.get("naming")), ("rank", info.get("rank")),
        ("alpha", info.get("alpha")), ("made for", info.get("family")),
        ("experts", "two (high + low noise in one file)" if info.get("two_expert") else info.get("expert_hint") or "one"),
        ("trigger words", ", ".join(info.get("trigger_words") or []) or "none"),
        ("size", f"{(info.get('size_bytes') or 0) / 1024:.1f} KB"), ("sha256", (info.get("sha256") or "")[:16]),
    ]
    lines = ["| field | value |", "|---|---|"] + [f"| {k} | {v if v is not None else '–'} |" for k, v in rows]
    by_expert = info.get("coverage_by_expert") or ({"model": info["coverage"]} if info.get("coverage") else {})
    for expert, cov in by_expert.items():
        lines.append(f"\n**{expert}**: {cov.get('applied', 0)}/{cov.get('total', 0)} keys applied"
                     + (f", {len(cov.get('unmatched') or [])} unmatched" if cov.get("unmatched") else "")
                     + (f", {len(cov.get('shape_mismatch') or [])} shape mismatches" if cov.get("shape_mismatch") else ""))
    if info.get("compatible") is False:
        lines.append(f"\n⚠ {info.get('reason')}")
    return "\n".join(lines)


def build_tools_tab(ctx: UIContext, model, rows_state) -> None:
    """Inside a gr.Tab. `model` and `rows_state` are the Generate tab's model picker and current stack."""
    engine = ctx.engine
    model_ids = [m.id for m in ctx.usable_models()]
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=360):
            gr.Markdown("### Merge the current stack into a new model\nBakes the Generate tab's stack into the "
                        "right experts of a copy of the model in the models folder, for sharing or quantising. "
                        "Unchanged parts are linked, not rewritten.")
            name = gr.Textbox(label="New model folder name", placeholder="e.g. my-model-anime", elem_id="merge-name")
            dtype = gr.Dropdown(DTYPES, value="", label="Weights dtype", elem_id="merge-dtype")
            merge_btn = gr.Button("Merge stack into new model", variant="primary", elem_id="merge-run")
            merge_status = gr.Markdown("", elem_id="merge-status")
            merge_json = gr.JSON(label="merge report", open=False, elem_id="merge-report")
        with gr.Column(scale=1, min_width=360):
            gr.Markdown("### Inspect a LoRA file")
            with gr.Row():
                lora = gr.Dropdown(_all_files(ctx), label="LoRA file", scale=3,
                                   elem_id="inspect-file")
                against = gr.Dropdown([("no model", "")] + [(m, m) for m in model_ids], value="",
                                      label="Coverage on model", scale=2, elem_id="inspect-model")
            with gr.Row():
                inspect_btn = gr.Button("Inspect", elem_id="inspect-run")
                rescan = gr.Button("↻ Rescan folder", size="sm")
            table = gr.Markdown("", elem_id="inspect-table")
            full = gr.JSON(label="full inspection", open=False, elem_id="inspect-json")

    def on_merge(model_id, rows, folder, dt, progress=gr.Progress()):
        try:
            stack = sl.to_stack(rows)
            if not stack.entries:
                return "⚠ the stack is empty: add LoRAs on the Generate tab first", None, gr.update()
            ctx.check_stack(ctx.spec_for(model_id), stack)
            report = engine.merge_stack(model_id, stack, folder, dtype=dt or None,
                                        on_progress=lambda done, total, _name: progress((done, total), desc="merging"))
        except WanStackError as e:
            return f"⚠ {e}", None, gr.update()
        log.info("merged %s into %s", model_id, report.get("out"))
        choices = [(ctx.model_label(m), m.id) for m in ctx.usable_models()]
        return (f"✓ wrote **{report.get('out')}** in {report.get('seconds', 0):.1f} s; pick it in the model list",
                report, gr.update(choices=choices))

    merge_btn.click(on_merge, [model, rows_state, name, dtype], [merge_status, merge_json, model],
                    api_visibility="private", concurrency_limit=1, concurrency_id="gpu")

    def on_inspect(file, model_id):
        if not file:
            return "⚠ pick a LoRA file", None
        try:
            info = engine.inspect_lora(file, model_id or None)
        except WanStackError as e:
            return f"⚠ {e}", None
        return inspection_markdown(info), info

    inspect_btn.click(on_inspect, [lora, against], [table, full], **PRIVATE)
    rescan.click(lambda: gr.update(choices=_all_files(ctx, refresh=True)), None, [lora], **PRIVATE)


def _all_files(ctx: UIContext, refresh: bool = False) -> list[str]:
    """Every LoRA file in the folder, whatever model it was made for (model_type None: no filter)."""
    return [d["file"] for d in ctx.loras(None, refresh=refresh)]
