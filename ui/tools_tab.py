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
    """The headline fields of an inspection as a small table; with a model, the keys that match it per expert
    (an inspection applies nothing: it says what a merge would apply)."""
    rows = [
        ("format", info.get("format") or info.get("naming")), ("rank", info.get("rank")),
        ("alpha", info.get("alpha")), ("made for", info.get("family")),
        ("experts", "two (high + low noise in one file)" if info.get("two_expert") else info.get("expert_hint") or "one"),
        ("trigger words", ", ".join(info.get("trigger_words") or []) or "none"),
        ("size", f"{(info.get('size_bytes') or 0) / 1024:.1f} KB"), ("sha256", (info.get("sha256") or "")[:16]),
    ]
    lines = ["| field | value |", "|---|---|"] + [f"| {k} | {v if v is not None else '–'} |" for k, v in rows]
    model = info.get("model") or {}
    by_expert = info.get("coverage_by_expert") or {}
    if model:
        storage = str(model.get("storage") or "")
        where = f"{model.get('id')}, " if model.get("id") else ""
        lines.append(f"\n**On {model.get('label') or model.get('type')}** ({where}{storage or 'diffusers'}; "
                     "what a merge or a run would apply):")
        if storage.startswith("gguf"):
            lines.append("\nGGUF weights stay quantized: a run applies this LoRA at run time (unmerged); "
                         "a merge cannot bake it into GGUF.")
    for expert, cov in by_expert.items():
        name = "model" if expert == "single" else expert.replace("_", "-") + " expert"
        lines.append(f"\n- **{name}**: {cov.get('applied', 0)}/{cov.get('total', 0)} keys match"
                     + (f", {len(cov.get('unmatched') or [])} unmatched" if cov.get("unmatched") else "")
                     + (f", {len(cov.get('shape_mismatch') or [])} shape mismatches" if cov.get("shape_mismatch") else ""))
    if info.get("compatible") is False:
        lines.append(f"\n⚠ {info.get('reason')}")
    return "\n".join(lines)


def merge_plan_markdown(ctx: UIContext, model_id: str | None, rows: list[dict]) -> str:
    """What the merge button will do: which model, which stack."""
    if not model_id:
        return "⚠ pick a model on the Generate tab first"
    entries = [r for r in rows or [] if r.get("file") and r.get("enabled", True)]
    if not entries:
        return f"Will copy **{model_id}**, but the stack is empty: add LoRAs on the Generate tab first."
    items = "\n".join(f"- `{r['file']}` × {r.get('weight', 1.0):g}"
                      + (f" on the {r['applies_to'].replace('_', '-')} expert" if r.get("applies_to", "both") != "both" else "")
                      for r in entries)
    view = next((m for m in ctx.models() if m.id == model_id), None)
    storage = getattr(view, "storage", "") or ""
    if storage.startswith("gguf"):
        return (f"⚠ **{model_id}** is GGUF ({storage}): its quantized experts cannot take a baked LoRA. Generate with "
                f"the stack instead (it is applied at run time), or merge into a bf16/fp8 version of the model.\n{items}")
    where = ("a copy of" if (view is None or view.source == "diffusers")
             else "a new recipe (expert files in their own storage) made from")
    return f"Will merge into {where} **{model_id}**:\n{items}"


def build_tools_tab(ctx: UIContext, tab, model, rows_state, default_model: str | None) -> None:
    """Inside the gr.Tab `tab`. `model` and `rows_state` are the Generate tab's model picker and current stack."""
    engine = ctx.engine
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=360):
            gr.Markdown("### Merge the current stack into a new model\nBakes the Generate tab's stack into the "
                        "right experts of a copy of the model in the models folder, for sharing or quantising. "
                        "Unchanged parts are linked, not rewritten.")
            what = gr.Markdown(merge_plan_markdown(ctx, default_model, []), elem_id="merge-what")
            name = gr.Textbox(label="New model name", placeholder="e.g. my-model-anime", elem_id="merge-name",
                              info="a plain name; a diffusers model becomes a folder, a single-file model (recipe, "
                                   "ComfyUI) a recipe NAME.json with its expert files; listed when done")
            dtype = gr.Dropdown(DTYPES, value="", label="Weights dtype", elem_id="merge-dtype",
                                info="diffusers models: cast the merged experts, or keep what they store; single "
                                     "files always keep their storage (fp8 stays fp8)")
            merge_btn = gr.Button("Merge stack into new model", variant="primary", elem_id="merge-run")
            merge_status = gr.Markdown("", elem_id="merge-status")
            merge_json = gr.JSON(label="merge report", open=False, elem_id="merge-report")
        with gr.Column(scale=1, min_width=360):
            gr.Markdown("### Inspect a LoRA file")
            with gr.Row():
                lora = gr.Dropdown(_all_files(ctx), label="LoRA file", scale=3, elem_id="inspect-file",
                                   info="any file in the LoRA folder")
                against = gr.Dropdown([("no model", "")] + [(m.id, m.id) for m in ctx.usable_models()],
                                      value=default_model or "", label="Coverage on model", scale=2,
                                      elem_id="inspect-model", info="which keys match this model")
            with gr.Row():
                inspect_btn = gr.Button("Inspect", elem_id="inspect-run")
                rescan = gr.Button("↻ Rescan LoRA folder", size="sm", elem_id="inspect-rescan")
            table = gr.Markdown("", elem_id="inspect-table")
            full = gr.JSON(label="full inspection", open=False, elem_id="inspect-json")

    def on_merge(model_id, rows, folder, dt):
        try:
            stack = sl.to_stack(rows)
            if not stack.entries:
                return "⚠ the stack is empty: add LoRAs on the Generate tab first", None, gr.update(), gr.update()
            report = engine.merge_stack(model_id, stack, folder, dtype=dt or None)
        except WanStackError as e:
            return f"⚠ {e}", None, gr.update(), gr.update()
        log.info("merged %s into %s", model_id, report.get("out"))
        models = ctx.usable_models()
        return (f"✓ wrote **{report.get('out')}** in {report.get('seconds', 0):.1f} s; pick it in the model list",
                report, gr.update(choices=[(m.display, m.id) for m in models]),
                gr.update(choices=[("no model", "")] + [(m.id, m.id) for m in models]))

    merge_btn.click(on_merge, [model, rows_state, name, dtype], [merge_status, merge_json, model, against],
                    api_visibility="private", concurrency_limit=1, concurrency_id="gpu", show_progress="minimal",
                    show_progress_on=[merge_status])

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
    # the tab follows the Generate tab: its model and stack are what a merge takes
    for trigger in (tab.select, model.change, rows_state.change):
        trigger(lambda m, rows: merge_plan_markdown(ctx, m, rows), [model, rows_state], [what], **PRIVATE)
    model.change(lambda m: gr.update(value=m or ""), [model], [against], **PRIVATE)


def _all_files(ctx: UIContext, refresh: bool = False) -> list[str]:
    """Every LoRA file in the folder, whatever model it was made for (model_type None: no filter)."""
    return [v.file for v in ctx.loras(None, refresh=refresh)]
