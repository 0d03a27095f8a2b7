"""The page: controls on the left (model, prompt, LoRA stack, named stacks, settings), the run on the right
(one progress element, one error message, preview, streamed and final video, gallery, stack report, plan)."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import gradio as gr

from engine.port import EnginePort
from engine.types import WanStackError
from ui import run_view as rv
from ui import stack_logic as sl
from ui.api import build_api
from ui.context import UIContext
from ui.gallery import GalleryPanel
from ui.generate import build_request, done_text, run_events, summary_of, wall_clock
from ui.model_panel import ModelPanel
from ui.presets_panel import PresetsPanel
from ui.speed_panel import SpeedPanel
from ui.speed_panel import options as speed_options
from ui.stack_editor import PRIVATE, StackEditor, wire
from ui.tools_tab import build_tools_tab

log = logging.getLogger(__name__)
CSS = (Path(__file__).with_name("style.css")).read_text()
THEME = gr.themes.Soft(primary_hue="indigo", text_size="sm", spacing_size="sm", radius_size="sm")
READY = rv.progress_html("ready")


class JobBoard:
    """How many page runs wait for the GPU and whether one runs: for the "waiting: 1 ahead" line."""

    def __init__(self):
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0

    def enqueue(self) -> int:
        with self._lock:
            ahead = self.waiting + self.running
            self.waiting += 1
            return ahead

    def start(self, queued: bool = True) -> None:
        """A job got the GPU; `queued`: it was counted as waiting (page runs are, API calls are not)."""
        with self._lock:
            if queued:
                self.waiting = max(0, self.waiting - 1)
            self.running += 1

    def finish(self) -> None:
        with self._lock:
            self.running = max(0, self.running - 1)


def build_ui(engine: EnginePort, default_model: str | None = None, max_rows: int = 6) -> gr.Blocks:
    ctx = UIContext(engine, max_rows=max_rows)
    models = ctx.usable_models()
    if default_model is None and models:
        real = [m for m in models if not m.demo]
        default_model = (real or models)[0].id
    panel = ModelPanel(ctx)
    editor = StackEditor(ctx)
    presets = PresetsPanel(ctx, editor)
    gallery = GalleryPanel(ctx, editor)
    jobs = JobBoard()
    speed = SpeedPanel()

    with gr.Blocks(title="WanStack", fill_width=True, analytics_enabled=False) as demo:
        rows_state = gr.State([])
        report_state = gr.State({})
        pair_state = gr.State(None)
        with gr.Tabs(elem_id="top-tabs"):
            with gr.Tab("Generate", elem_id="generate-tab"):
                with gr.Row(elem_id="main-row"):
                    with gr.Column(scale=6, min_width=520, elem_id="controls"):
                        panel.build_picker(default_model)
                        panel.build_prompt()
                        editor.build(panel.default_spec)
                        presets.build()
                        with gr.Accordion("Settings", open=True, elem_id="settings"):
                            panel.build_settings()
                        speed.build()
                    with gr.Column(scale=5, min_width=400, elem_id="output"):
                        with gr.Row(elem_id="run-buttons"):
                            run_btn = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
                        status = gr.HTML(READY, elem_id="run-status")
                        error = gr.HTML("", elem_id="run-error")
                        with gr.Row(equal_height=True):
                            preview = gr.HTML(rv.IDLE_PREVIEW, elem_id="preview")
                            stream = gr.Video(label="Decoding…", streaming=True, autoplay=True, height=200,
                                              interactive=False, elem_id="stream-video",
                                              visible=bool(panel.default_spec and not panel.default_spec.demo))
                        video = gr.Video(label="Video", height=260, interactive=False, autoplay=True, loop=True,
                                         elem_id="video")
                        with gr.Tabs():
                            with gr.Tab("Gallery", elem_id="history-tab"):
                                gallery.build()
                            with gr.Tab("Stack & memory", elem_id="report-tab"):
                                report = gr.Markdown("", elem_id="stack-report", elem_classes="small-note")
                                plan = gr.Markdown("", elem_id="memory-plan", elem_classes="small-note")
                                gauge = gr.HTML("", elem_id="gauge")
                            with gr.Tab("Result JSON", elem_id="result-tab"):
                                summary = gr.JSON(label="summary", elem_id="summary")
            with gr.Tab("Tools", elem_id="tools-tab") as tools_tab:
                build_tools_tab(ctx, tools_tab, panel.model, rows_state, default_model)
        build_api(ctx, jobs)

        model = panel.model
        wire(editor, model, rows_state, report_state, pair_state, panel.prompt)
        presets.wire(model, rows_state, report_state, pair_state, panel)
        gallery.wire(model, panel, rows_state, pair_state, report_state, error)
        panel.wire_duration()
        editor_out = [rows_state, pair_state] + editor.outputs()
        settings_out = panel.settings_outputs()

        def spec_of(model_id):
            try:
                return ctx.spec_for(model_id) if model_id else None
            except WanStackError:
                return None

        def on_model(model_id, rows):
            spec = spec_of(model_id)
            return [rows, None] + editor.render(rows, spec) + panel.settings_updates(model_id, spec)

        model.input(on_model, [model, rows_state], editor_out + settings_out, **PRIVATE)

        def on_rescan(model_id, rows):
            choices = panel.choices(refresh=True)
            ctx.loras(None, refresh=True)
            ids = [c[1] for c in choices]
            keep = model_id if model_id in ids else (ids[0] if ids else None)
            spec = spec_of(keep)
            return ([gr.update(choices=choices, value=keep), rows, None] + editor.render(rows, spec)
                    + panel.settings_updates(keep, spec))

        panel.rescan.click(on_rescan, [model, rows_state], [model] + editor_out + settings_out, **PRIVATE)

        def on_page_load(model_id):
            # every (re)load shows the server's current lists: the same models, presets and outputs in every tab
            choices = panel.choices()
            return (gr.update(choices=choices), gr.update(choices=presets.choices()), gallery.refresh_update(),
                    rv.gauge_html(_vram(engine)))

        demo.load(on_page_load, [model], [model, presets.preset, gallery.gallery, gauge], **PRIVATE)

        run_inputs = [model, panel.prompt, panel.negative, panel.image, panel.resolution, panel.frames, panel.fps,
                      panel.steps, panel.guidance, panel.guidance_2, panel.shift, panel.seed, panel.stream_video,
                      rows_state] + speed.inputs()
        # Only the run panel's own parts: never the stack rows (their coverage is redrawn after the run).
        run_outputs = [status, error, preview, stream, video, report, plan, gauge, summary, report_state,
                       gallery.gallery]

        def on_queue():
            ahead = jobs.enqueue()
            text = f"waiting: {ahead} ahead" if ahead else "starting…"
            return rv.progress_html(text, None, "waiting"), ""

        def on_run(model_id, prompt, negative, image, resolution, frames, fps, steps, guidance, guidance_2, shift,
                   seed, stream_video, rows, *speed_values):
            jobs.start()
            try:
                yield from _run(model_id, prompt, negative, image, resolution, frames, fps, steps, guidance,
                                guidance_2, shift, seed, stream_video, rows, *speed_values)
            finally:
                jobs.finish()

        def _run(model_id, prompt, negative, image, resolution, frames, fps, steps, guidance, guidance_2, shift,
                 seed, stream_video, rows, *speed_values):
            try:
                spec = ctx.spec_for(model_id)
                width, height = panel.size_of(spec, resolution)
                request = build_request(ctx, model_id, prompt, negative, image, width, height, frames, steps, seed,
                                        sl.to_stack(rows), fps, guidance, guidance_2, shift,
                                        speed_options(*speed_values) if speed_values else None)
            except WanStackError as e:
                yield {status: READY, error: rv.error_html(str(e))}
                return
            started = wall_clock()
            warnings = "\n".join(f"⚠ {w}" for w in request.warnings)
            yield {status: rv.progress_html("starting…", None, "running"), error: "", preview: rv.IDLE_PREVIEW,
                   stream: None, video: None, report: warnings, plan: "", summary: None}
            parts = {"progress": status, "report": report, "plan": plan, "gauge": gauge, "preview": preview,
                     "chunk": stream}
            for kind, payload in run_events(ctx, request, stream_video=bool(stream_video)):
                if kind == "update":
                    yield {parts[k]: v for k, v in payload.items()}
                elif kind == "failed":
                    if payload.cancelled:
                        text = payload.message[0].upper() + payload.message[1:]
                        yield {status: rv.progress_html(f"■ {text}. Ready for the next run.", None, "stopped"),
                               gallery.gallery: gallery.refresh_update()}
                    else:
                        yield {status: rv.progress_html("Run failed (see the message below). Ready again.", None,
                                                        "failed"),
                               error: rv.error_html(payload.message), gallery.gallery: gallery.refresh_update()}
                    return
                elif kind == "result":
                    result = payload
                    yield {status: rv.progress_html(done_text(result, wall_clock() - started), 1.0, "done"),
                           video: result.path, summary: summary_of(result),
                           report_state: {r.get("file"): r for r in result.loras or []},
                           gallery.gallery: gallery.refresh_update()}

        def after_run(model_id, rows, report):
            spec = spec_of(model_id)
            return editor.render(rows, spec, "", report)

        run_btn.click(on_queue, None, [status, error], **PRIVATE).then(
            on_run, run_inputs, run_outputs, api_visibility="private", concurrency_limit=1, concurrency_id="gpu",
            show_progress="hidden").then(after_run, [model, rows_state, report_state], editor.outputs(), **PRIVATE)
        stop_btn.click(lambda: engine.cancel(), None, None, **PRIVATE)
        panel.stream_video.change(lambda on: gr.update(visible=bool(on)), [panel.stream_video], [stream], **PRIVATE)
    demo.wanstack_ctx = ctx  # for tests and app.py
    return demo


def _vram(engine: EnginePort):
    try:
        return engine.vram()
    except WanStackError as e:
        from engine.port import MemoryView

        return MemoryView(reason=str(e))
