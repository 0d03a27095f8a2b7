"""Named API endpoints for gradio_client: /generate, /models, /loras, /presets."""
from __future__ import annotations

import logging

import gradio as gr

from engine.types import GenerationCancelled, RequestError, WanStackError
from ui.context import UIContext
from ui.generate import build_request, run_events, summary_of

log = logging.getLogger(__name__)


def build_api(ctx: UIContext) -> None:
    """Call inside the Blocks context. /generate uses hidden components so files travel as Gradio files."""
    with gr.Column(visible=False, elem_id="api-inputs"):
        model = gr.Textbox(label="model")
        prompt = gr.Textbox(label="prompt")
        negative = gr.Textbox(label="negative_prompt")
        image = gr.Image(label="image", type="filepath")
        stack = gr.Textbox(label="stack")
        width = gr.Number(label="width", precision=0)
        height = gr.Number(label="height", precision=0)
        frames = gr.Number(label="frames", precision=0)
        steps = gr.Number(label="steps", precision=0)
        seed = gr.Number(label="seed", precision=0, value=-1)
        video = gr.Video(label="video")
        summary = gr.JSON(label="summary")
        trigger = gr.Button("generate")

    def generate(model_id, prompt_text, negative_text, image_path, stack_text, w, h, f, s, seed_value):
        """Generate one video. `stack` is a JSON list of entries or a preset name. Returns (video, summary)."""
        try:
            spec = ctx.spec_for(model_id)
            request = build_request(ctx, model_id, prompt_text, negative_text, image_path, w, h, f, s, seed_value,
                                    ctx.stack_from_text(stack_text, spec))
            result = None
            for kind, payload in run_events(ctx, request, stream_video=False):
                if kind == "result":
                    result = payload
        except GenerationCancelled as e:
            raise gr.Error(f"stopped: {e}") from None
        except (RequestError, WanStackError) as e:
            raise gr.Error(str(e)) from None
        return result.path, summary_of(result)

    trigger.click(generate, [model, prompt, negative, image, stack, width, height, frames, steps, seed],
                  [video, summary], api_name="generate", concurrency_limit=1, concurrency_id="gpu")

    def models() -> list[dict]:
        """Detected models: id, type, ok, reason, demo."""
        return [{"id": m.id, "type": m.type, "ok": m.ok, "reason": m.reason, "demo": m.demo} for m in ctx.models()]

    def loras(model: str) -> list[dict]:
        """LoRA files in the server's folder with compatibility for the given model id."""
        try:
            spec = ctx.spec_for(model)
        except RequestError as e:
            raise gr.Error(str(e)) from None
        return [{k: v for k, v in d.items()} for d in ctx.loras(spec.type)]

    def presets() -> list[dict]:
        """Saved named stacks: name, model_type, entries."""
        return [{"name": p.name, "model_type": p.model_type, "entries": p.entries, "updated": p.updated}
                for p in ctx.store.list()]

    gr.api(models, api_name="models", queue=False)
    gr.api(loras, api_name="loras", queue=False)
    gr.api(presets, api_name="presets", queue=False)
