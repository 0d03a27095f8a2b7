"""Model picker, prompt and generation settings; the task (T2V / I2V / TI2V) follows the model."""
from __future__ import annotations

import logging

import gradio as gr

from engine.port import ModelSpec
from engine.types import RequestError, WanStackError
from ui.context import UIContext

log = logging.getLogger(__name__)
TASK_LABEL = {"t2v": "text → video", "i2v": "image → video (start image required)", "ti2v": "text/image → video (image optional)"}


class ModelPanel:
    def __init__(self, ctx: UIContext):
        self.ctx = ctx

    def choices(self, refresh: bool = False) -> list[tuple[str, str]]:
        return [(m.display, m.id) for m in self.ctx.usable_models(refresh)]

    def build_picker(self, default_id: str | None):
        self.default_spec = None
        if default_id:
            try:
                self.default_spec = self.ctx.spec_for(default_id)
            except RequestError as e:
                log.warning("default model %s unusable: %s", default_id, e)
        with gr.Row(equal_height=True, elem_id="model-row"):
            gr.Markdown("### WanStack", elem_id="title")
            self.model = gr.Dropdown(self.choices(), value=default_id, label="Model", show_label=False,
                                     container=False, scale=4, min_width=220, elem_id="model-picker")
            self.rescan = gr.Button("↻ Rescan models", size="sm", scale=0, min_width=130, elem_id="rescan-models")
        self.model_note = gr.Markdown(self.note(default_id), elem_id="model-note", elem_classes="small-note")

    def build_prompt(self):
        task = self.default_spec.task if self.default_spec else "t2v"
        with gr.Row(equal_height=True, elem_id="prompt-row"):
            self.prompt = gr.Textbox(label="Prompt", lines=2, max_lines=4, scale=3, elem_id="prompt",
                                     placeholder="a red fox running through snow, cinematic")
            self.negative = gr.Textbox(label="Negative prompt (optional)", lines=2, max_lines=4, scale=2,
                                       elem_id="negative-prompt", placeholder="what to avoid: blurry, text, watermark")
            self.image = gr.Image(label=image_label(task), type="filepath", visible=task in ("i2v", "ti2v"), height=110,
                                  scale=1, min_width=110, sources=["upload", "clipboard"], elem_id="start-image")

    def build_settings(self):
        spec = self.default_spec
        choices, default = resolution_choices(spec) if spec else ([], None)
        d = (lambda name, fallback: getattr(spec, name) if spec else fallback)
        with gr.Row():
            self.resolution = gr.Dropdown(choices, value=default, label="Resolution", scale=2, min_width=150,
                                          elem_id="resolution", info="width × height of the video")
            self.frames = gr.Slider(1, max(161, d("frames", 81)), step=4, value=d("frames", 81), label="Frames", scale=3,
                                    min_width=160, elem_id="frames", info="4k+1 frames (e.g. 81)")
            self.fps = gr.Number(d("fps", 16), label="fps", precision=0, minimum=1, maximum=60, scale=1, min_width=70,
                                 elem_id="fps", info="playback speed")
            self.steps = gr.Number(d("steps", 40), label="Steps", precision=0, minimum=1, maximum=200, scale=1,
                                   min_width=70, elem_id="steps", info="denoising steps")
        with gr.Row():
            self.guidance = gr.Number(d("guidance", 5.0), label="Guidance", minimum=0, maximum=30, step=0.5, scale=1,
                                      min_width=100, elem_id="guidance", info="how closely to follow the prompt")
            self.guidance_2 = gr.Number(d("guidance_2", None), label="Low-noise guidance", minimum=0, maximum=30,
                                        step=0.5, scale=1, min_width=130, visible=bool(spec and spec.dual_expert),
                                        elem_id="guidance-2", info="guidance of the low-noise expert")
            self.shift = gr.Number(d("shift", 5.0), label="Shift", minimum=0.1, maximum=50, step=0.5, scale=1,
                                   min_width=90, elem_id="shift", info="scheduler shift")
            self.seed = gr.Number(-1, label="Seed", precision=0, minimum=-1, scale=1, min_width=130,
                                  elem_id="seed", info="-1 draws a random seed")
        with gr.Row(equal_height=True):
            self.duration = gr.Markdown(self.duration_text(d("frames", 81), d("fps", 16)), elem_id="duration",
                                        elem_classes="small-note")
            # Gradio's streaming player runs ffmpeg and ffprobe from PATH: without them, the box is off with the reason
            no_stream = self.ctx.engine.streaming_problem()
            self.stream_video = gr.Checkbox(not (spec and spec.demo) and not no_stream, label="Stream video while decoding",
                                            container=False, elem_id="stream-toggle",
                                            info=no_stream or "show the video as the VAE decodes it (costs a little time)",
                                            interactive=no_stream is None)

    def note(self, model_id: str | None) -> str:
        if not model_id:
            bad = [m for m in self.ctx.models() if not m.ok]
            return "No usable model." + ("".join(f"\n- `{m.id}`: {m.reason}" for m in bad) if bad else "")
        try:
            info = self.ctx.model(model_id)
            spec = self.ctx.spec_for(model_id)
        except WanStackError as e:
            return f"⚠ {e}"
        parts = [spec.label.replace(" (random weights)", ""), TASK_LABEL.get(spec.task, spec.task)]
        if info.demo:
            parts.append("**random weights**: the video is noise; for trying the app")
        parts.append("2 experts" if spec.dual_expert else "1 expert")
        unusable = [m for m in self.ctx.models() if not m.ok]
        text = " · ".join(parts)
        if unusable:
            text += "<br>not usable: " + "; ".join(f"`{m.id}` ({m.reason})" for m in unusable)
        return text

    @staticmethod
    def duration_text(frames, fps) -> str:
        try:
            return f"{int(frames)} frames = **{int(frames) / max(1, int(fps)):.2f} s** at {int(fps)} fps"
        except (TypeError, ValueError):
            return ""

    def settings_outputs(self) -> list:
        return [self.model_note, self.image, self.resolution, self.frames, self.fps, self.steps, self.guidance,
                self.guidance_2, self.shift, self.duration, self.stream_video]

    def settings_updates(self, model_id: str | None, spec: ModelSpec | None) -> list:
        if spec is None:
            return [self.note(model_id)] + [gr.update()] * 10
        choices, default = resolution_choices(spec)
        return [
            self.note(model_id),
            gr.update(visible=spec.task in ("i2v", "ti2v"), label=image_label(spec.task)),
            gr.update(choices=choices, value=default),
            gr.update(value=spec.frames, maximum=max(161, spec.frames)),
            gr.update(value=spec.fps),
            gr.update(value=spec.steps),
            gr.update(value=spec.guidance),
            gr.update(value=spec.guidance_2, visible=spec.dual_expert),
            gr.update(value=spec.shift),
            self.duration_text(spec.frames, spec.fps),
            # Each streamed segment costs an ffmpeg mux in Gradio (~0.3 s here): worth it when decoding takes
            # tens of seconds (real models), not for the demo's one-second decode.
            gr.update(value=not spec.demo and self.ctx.engine.streaming_problem() is None),
        ]

    @staticmethod
    def size_of(spec: ModelSpec, resolution: str | None) -> tuple[int, int]:
        return spec.resolutions.get(resolution or "", (spec.width, spec.height))

    def wire_duration(self) -> None:
        for comp in (self.frames, self.fps):
            comp.change(self.duration_text, [self.frames, self.fps], [self.duration], api_visibility="private",
                        queue=False, show_progress="hidden")


def image_label(task: str) -> str:
    return "Start image (required)" if task == "i2v" else "Start image (optional)"


def resolution_choices(spec: ModelSpec) -> tuple[list, str]:
    """Dropdown choices '480p landscape (832×480)' and the one matching the model's default size."""
    if not spec.resolutions:
        label = f"{spec.width}×{spec.height}"
        return [(label, label)], label
    choices = [(f"{k} ({w}×{h})", k) for k, (w, h) in spec.resolutions.items()]
    default = next((k for k, v in spec.resolutions.items() if v == (spec.width, spec.height)), next(iter(spec.resolutions)))
    return choices, default
