"""Speed switches in the Settings panel: attention backend, torch.compile, step cache (engine/speed through the
door). Each label says what the switch really does and when it does nothing."""
from __future__ import annotations

import gradio as gr

from engine.port import ATTENTION_CHOICES, CACHE_CHOICES, MIN_CACHE_STEPS, SpeedOptions

COMPILE_LABELS = {"auto": "auto (on with a GPU, off on a CPU)", "on": "on", "off": "off"}
CACHE_LABELS = {"off": "off", "first_block": "First-Block cache"}


class SpeedPanel:
    def build(self) -> None:
        with gr.Accordion("Speed", open=False, elem_id="speed"):
            with gr.Row():
                self.attention = gr.Dropdown(
                    list(ATTENTION_CHOICES), value="auto", label="Attention backend", scale=2, min_width=150,
                    elem_id="speed-attention",
                    info="auto: the fastest installed for this device; one that is missing or fails falls back to "
                         "PyTorch SDPA, and the memory plan says why")
                self.compile = gr.Radio(
                    [(label, key) for key, label in COMPILE_LABELS.items()], value="auto", label="torch.compile",
                    scale=2, min_width=200, elem_id="speed-compile",
                    info="compiles each transformer block once per model (the first run takes minutes); LoRA stack "
                         "changes never recompile; off for runs with scheduled LoRAs or sequential offload")
            with gr.Row():
                self.cache = gr.Dropdown(
                    [(label, key) for key, label in CACHE_LABELS.items()], value="off", label="Step cache", scale=2,
                    min_width=150, elem_id="speed-cache",
                    info=f"reuses the blocks after the first when a step changes little; needs {MIN_CACHE_STEPS}+ "
                         "steps (off otherwise), changes the video slightly; the run reports steps skipped")
                self.threshold = gr.Slider(0.01, 0.5, value=0.05, step=0.01, label="Cache threshold", scale=2,
                                           min_width=150, elem_id="speed-cache-threshold",
                                           info="higher skips more steps (faster, further from the uncached video)")

    def inputs(self) -> list:
        return [self.attention, self.compile, self.cache, self.threshold]


def options(attention, compile_mode, cache, threshold) -> SpeedOptions:
    """The page's switches as the request's speed options (RequestError names a bad value)."""
    return SpeedOptions(attention=attention or "auto", compile=compile_mode or "auto", cache=cache or "off",
                        cache_threshold=float(threshold) if cache and cache != "off" and threshold else None)
