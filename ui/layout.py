"""The page: controls on the left (model, prompt, LoRA stack, presets, settings), run output on the right."""
from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from engine.types import GenerationCancelled, RequestError, WanStackError
from ui import stack_logic as sl
from ui.api import build_api
from ui.context import UIContext
from ui.generate import build_request, format_gauge, request_for_history, run_events, sample_from_snapshot, summary_of
from ui.model_panel import ModelPanel
from ui.presets_panel import PresetsPanel
from ui.stack_editor import PRIVATE, StackEditor, wire
from ui.tools_tab import build_tools_tab

log = logging.getLogger(__name__)
CSS = (Path(__file__).with_name("style.css")).read_text()
THEME = gr.themes.Soft(primary_hue="indigo", text_size="sm", spacing_size="sm", radius_size="sm")


def build_ui(engine, default_model: str | None = None, max_rows: int = 6) -> gr.Blocks:
    ctx = UIContext(engine, max_rows=max_rows)
    models = ctx.usable_models()
    if default_model is None and models:
        real = [m for m in models if not m.demo]
        default_model = (real or models)[0].id
    panel = ModelPanel(ctx)
    editor = StackEditor(ctx)
    presets = PresetsPanel(ctx, editor)

    with gr.Blocks(title="WanStack", fill_width=True, analytics_enabled=False) as demo:
        rows_state = gr.State([])
        report_state = gr.State({})
        pair_state = gr.State(None)
        history_state = gr.State([])
        selected_state = gr.State(None)
        with gr.Tabs(elem_id="top-tabs"):
            with gr.Tab("Generate", elem_id="generate-tab"):
                with gr.Row(elem_id="main-row"):
                    with gr.Column(scale=6, min_width=480, elem_id="controls"):
                        panel.build_picker(default_model)
                        panel.build_prompt()
                        editor.build(panel.default_spec)
                        presets.build()
                        with gr.Accordion("Settings", open=True, elem_id="settings"):
                            panel.build_settings()
                    with gr.Column(scale=5, min_width=380, elem_id="output"):
                        with gr.Row():
                            run_btn = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
                        status = gr.Markdown("ready", elem_id="run-status", elem_classes="run-status")
                        gauge = gr.HTML("", elem_id="gauge")
                        with gr.Row(equal_height=True):
                            preview = gr.HTML("<div class='preview-box empty'><span>live preview of the latents, every step</span></div>",
                                              elem_id="preview")
                            stream = gr.Video(label="Decoding…", streaming=True, autoplay=True, height=200,
                                              interactive=False, elem_id="stream-video",
                                              visible=bool(panel.default_spec and not panel.default_spec.demo))
                        video = gr.Video(label="Video", height=260, interactive=False, autoplay=True, loop=True,
                                         elem_id="video")
                        report = gr.Markdown("", elem_id="stack-report", elem_classes="small-note")
                        plan = gr.Markdown("", elem_id="memory-plan", elem_classes="small-note")
                        with gr.Tabs():
                            with gr.Tab("History", elem_id="history-tab"):
                                gallery = gr.Gallery(label="This session", columns=6, height=150, elem_id="history", object_fit="contain",
                                                     allow_preview=False)
                                with gr.Row():
                                    reuse = gr.Button("Reuse these settings", size="sm", elem_id="reuse")
                                picked = gr.JSON(label="Settings of the picked video", elem_id="history-settings",
                                                 open=False)
                            with gr.Tab("Result JSON", elem_id="result-tab"):
                                summary = gr.JSON(label="summary", elem_id="summary")
            with gr.Tab("Tools", elem_id="tools-tab"):
                build_tools_tab(ctx, panel.model, rows_state)
        build_api(ctx)

        model = panel.model
        wire(editor, model, rows_state, report_state, pair_state, panel.prompt)
        presets.wire(model, rows_state, report_state, pair_state)
        panel.wire_duration()
        editor_out = [rows_state, pair_state] + editor.outputs()
        settings_out = panel.settings_outputs()

        def spec_of(model_id):
            try:
                return ctx.spec_for(model_id) if model_id else None
            except RequestError:
                return None

        def on_model(model_id, rows):
            spec = spec_of(model_id)
            return ([rows, None] + editor.render(rows, spec) + panel.settings_updates(model_id, spec)
                    + [gr.update(choices=ctx.preset_choices())])

        model.input(on_model, [model, rows_state], editor_out + settings_out + [presets.preset], **PRIVATE)
        # the page is built for the default model already; a (re)load only needs the current preset list
        demo.load(lambda: gr.update(choices=ctx.preset_choices()), None, [presets.preset], **PRIVATE)

        run_inputs = [model, panel.prompt, panel.negative, panel.image, panel.resolution, panel.frames, panel.fps,
                      panel.steps, panel.guidance, panel.guidance_2, panel.shift, panel.seed, panel.stream_video, rows_state,
                      history_state]
        run_outputs = [status, preview, stream, video, report, plan, gauge, summary, history_state, gallery,
                       report_state] + editor.outputs()

        def on_run(model_id, prompt, negative, image, resolution, frames, fps, steps, guidance, guidance_2, shift,
                   seed, stream_video, rows, history, progress=gr.Progress()):
            # Bad input is reported in the status line and a toast, not as gr.Error: an error marks every
            # output component of this event, which here is half the page.
            try:
                spec = ctx.spec_for(model_id)
                missing = [f"row {i + 1} ({r['file']})" for i, r in enumerate(rows)
                           if r.get("file") and ctx.lora_info(spec.type, r["file"]) is None]
                if missing:
                    raise RequestError(f"LoRA file missing from the folder: {', '.join(missing)}; copy it back, "
                                       "pick another file or remove the row")
                width, height = panel.size_of(spec, resolution)
                request = build_request(ctx, model_id, prompt, negative, image, width, height, frames, steps, seed,
                                        sl.to_stack(rows), fps, guidance, guidance_2, shift, warn=gr.Warning)
            except (RequestError, WanStackError) as e:
                gr.Warning(str(e))
                yield {status: f"⚠ {e}"}
                return
            yield {status: "starting…", preview: "", stream: None, video: None, report: "", plan: "",
                   summary: None}
            result = None
            try:
                for kind, payload in run_events(ctx, request, progress, stream_video=bool(stream_video)):
                    if kind == "result":
                        result = payload
                        continue
                    out = {}
                    for key, comp in (("status", status), ("report", report), ("plan", plan), ("gauge", gauge),
                                      ("preview", preview), ("chunk", stream)):
                        if key in payload:
                            out[comp] = payload[key]
                    if out:
                        yield out
            except GenerationCancelled as e:
                text = str(e) or "stopped"
                yield {status: f"■ {text[0].upper()}{text[1:]}. Ready for the next run."}
                return
            except (RequestError, WanStackError) as e:
                gr.Warning(str(e))
                yield {status: f"⚠ {e}"}
                return
            coverage = {r.get("file"): r for r in result.loras or []}
            settings = request_for_history(request, resolution)
            settings["seed"] = result.seed
            history = history + [{"path": result.path, "settings": settings, "summary": summary_of(result)}]
            caption = lambda h: f"seed {h['settings']['seed']} · {h['settings']['prompt'][:30]}"  # noqa: E731
            done = {
                status: f"✓ Done in {result.seconds:.1f} s · seed **{result.seed}** · {result.frames} frames "
                        f"{result.width}×{result.height} @ {result.fps} fps · offload {result.offload}",
                video: result.path, summary: summary_of(result), history_state: history,
                gallery: [(h["path"], caption(h)) for h in history], report_state: coverage,
            }
            done.update(zip(editor.outputs(), editor.render(rows, spec, "", coverage)))
            yield done

        run_btn.click(on_run, run_inputs, run_outputs, api_visibility="private", concurrency_limit=1,
                      concurrency_id="gpu", show_progress="minimal")
        stop_btn.click(lambda: engine.cancel(), None, None, **PRIVATE)
        panel.stream_video.change(lambda on: gr.update(visible=bool(on)), [panel.stream_video], [stream], **PRIVATE)

        def on_pick(history, evt: gr.SelectData):
            if not history or evt.index is None or evt.index >= len(history):
                return None, None
            return evt.index, history[evt.index]["settings"]

        gallery.select(on_pick, [history_state], [selected_state, picked], **PRIVATE)

        def on_reuse(index, history, report):
            if not history:
                raise gr.Error("no video in this session's history yet; generate one first")
            if index is None or index >= len(history):
                index = len(history) - 1  # nothing picked: the latest run
            s = history[index]["settings"]
            try:
                spec = ctx.spec_for(s["model"])
            except RequestError as e:
                raise gr.Error(f"cannot reuse: {e}") from None
            rows = [{**sl.new_row(), **e} for e in s["stack"]]
            updates = panel.settings_updates(s["model"], spec)
            # settings_updates gives the model's defaults; the run's own values go on top
            values = {panel.frames: s["frames"], panel.fps: s["fps"], panel.steps: s["steps"],
                      panel.guidance: s["guidance"], panel.guidance_2: s["guidance_2"], panel.shift: s["shift"],
                      panel.resolution: s["resolution"]}
            out = dict(zip(settings_out, updates))
            for comp, value in values.items():
                if value is not None:
                    base = out.get(comp)
                    out[comp] = {**base, "value": value} if isinstance(base, dict) else gr.update(value=value)
            out.update({model: s["model"], panel.prompt: s["prompt"], panel.negative: s["negative_prompt"],
                        panel.seed: s["seed"], rows_state: rows, pair_state: None})
            out.update(zip(editor.outputs(), editor.render(rows, spec, "", report)))
            return out

        reuse.click(on_reuse, [selected_state, history_state, report_state],
                    [model, panel.prompt, panel.negative, panel.seed, rows_state, pair_state] + settings_out
                    + editor.outputs(), **PRIVATE)
        demo.load(lambda: format_gauge(sample_from_snapshot(_vram(engine))), None, [gauge], **PRIVATE)
    demo.wanstack_ctx = ctx  # for tests and app.py
    return demo


def _vram(engine) -> dict | None:
    if not hasattr(engine, "vram"):
        return None
    try:
        return engine.vram()
    except WanStackError as e:
        return {"available": False, "reason": str(e)}
