"""Named API endpoints for gradio_client: /generate, /models, /loras, /presets."""
from __future__ import annotations

import json
import logging

import gradio as gr

from engine.types import RequestError, WanStackError
from ui.context import UIContext
from ui.generate import build_request, run_events, summary_of

log = logging.getLogger(__name__)


def build_api(ctx: UIContext, jobs=None) -> None:
    """Call inside the Blocks context. /generate uses hidden components so files travel as Gradio files."""
    with gr.Column(visible=False, elem_id="api-inputs"):
        inputs = [
            gr.Textbox(label="model"), gr.Textbox(label="prompt"), gr.Textbox(label="negative_prompt"),
            gr.Image(label="image", type="filepath"), gr.Textbox(label="stack"),
            gr.Number(label="width", precision=0), gr.Number(label="height", precision=0),
            gr.Number(label="frames", precision=0), gr.Number(label="steps", precision=0),
            gr.Number(label="seed", precision=0, value=-1),
        ]
        # summary is JSON *text*: gradio_client would take a dict with a "path" key for a file and download it
        outputs = [gr.Video(label="video"), gr.Textbox(label="summary")]
        trigger = gr.Button("generate")

    # parameter names are the API's keyword names (gradio_client: predict(model=..., stack=...))
    def generate(model, prompt, negative_prompt, image, stack, width, height, frames, steps, seed):
        """Generate one video. `stack` is a JSON list of entries or a preset name. Returns (video, summary JSON text)."""
        try:
            spec = ctx.spec_for(model)
            request = build_request(ctx, model, prompt, negative_prompt, image, width, height, frames, steps, seed,
                                    ctx.stack_from_text(stack, spec))
        except WanStackError as e:
            raise gr.Error(str(e)) from None
        result = None
        if jobs is not None:
            jobs.start(queued=False)
        try:
            for kind, payload in run_events(ctx, request, stream_video=False):
                if kind == "result":
                    result = payload
                elif kind == "failed":
                    raise gr.Error(f"stopped: {payload.message}" if payload.cancelled else payload.message)
        finally:
            if jobs is not None:
                jobs.finish()
        return result.path, json.dumps(summary_of(result))

    trigger.click(generate, inputs, outputs, api_name="generate", concurrency_limit=1, concurrency_id="gpu")

    def models() -> list[dict]:
        """Detected models: id, type, ok, reason, demo, and where they come from: source (diffusers, recipe,
        comfyui), storage (fp8_scaled, gguf-Q4_K, ...), storage_label and files (component -> file name)."""
        return [{"id": m.id, "type": m.type, "ok": m.ok, "reason": m.reason, "demo": m.demo, "source": m.source,
                 "storage": m.storage, "storage_label": m.storage_label, "files": dict(m.files)} for m in ctx.models()]

    def loras(model: str) -> list[dict]:
        """LoRA files in the server's folder with compatibility for the given model id."""
        try:
            spec = ctx.spec_for(model)
        except RequestError as e:
            raise gr.Error(str(e)) from None
        return [v.to_dict() for v in ctx.loras(spec.type)]

    def presets() -> list[dict]:
        """Saved named stacks: name, model_type, entries."""
        return [{"name": p.name, "model_type": p.model_type, "entries": list(p.entries), "updated": p.updated}
                for p in ctx.engine.presets()]

    gr.api(models, api_name="models", queue=False)
    gr.api(loras, api_name="loras", queue=False)
    gr.api(presets, api_name="presets", queue=False)
