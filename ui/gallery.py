"""The gallery over the outputs folder: every past run (also from earlier sessions) with its first frame,
a readable caption, failed and stopped runs included, and "reuse these settings" from its sidecar."""
from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from engine.port import OutputView
from engine.types import WanStackError
from ui import stack_logic as sl
from ui.context import UIContext
from ui.stack_editor import PRIVATE, StackEditor

log = logging.getLogger(__name__)
# How often each page asks whether the outputs folder changed (one stat; the list is re-read only then), so
# a run from another tab or session shows up without a click.
POLL_SECONDS = 3.0


def gallery_items(outputs: list[OutputView]) -> list[tuple[str, str]]:
    return [(o.thumbnail, o.caption) for o in outputs if o.thumbnail]


def picked_markdown(o: OutputView | None) -> str:
    if o is None:
        return "Pick a run above to see its settings; **Reuse these settings** puts them back in the form."
    s = o.settings
    head = {"done": "✓ video", "failed": "⚠ failed", "stopped": "■ stopped"}.get(o.status, o.status)
    lines = [f"**{head}** · {o.created or o.id}"]
    if o.message:
        lines.append(f"_{o.message}_")
    if s:
        lines.append(f"{s.get('model', '?')} · {s.get('width')}×{s.get('height')} · {s.get('frames')} frames "
                     f"@ {s.get('fps')} fps · {s.get('steps')} steps · seed {s.get('seed')}")
        lines.append(f"prompt: {s.get('prompt', '')}")
        stack = s.get("stack") or []
        if stack:
            lines.append("stack: " + ", ".join(f"`{e.get('file')}` × {e.get('weight')}" for e in stack))
    return "\n\n".join(lines)


class GalleryPanel:
    def __init__(self, ctx: UIContext, editor: StackEditor):
        self.ctx = ctx
        self.editor = editor

    def build(self):
        self.picked_state = gr.State(None)  # the id (file stem) of the picked run
        with gr.Row(equal_height=True):
            gr.Markdown("Every run in the outputs folder, newest first (failed and stopped runs too).",
                        elem_classes="small-note")
            self.refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=90, elem_id="gallery-refresh")
        self.gallery = gr.Gallery(gallery_items(self.ctx.engine.outputs()), label="Outputs", show_label=False,
                                  columns=6, height=200, elem_id="history", object_fit="contain",
                                  allow_preview=False)
        self.picked = gr.Markdown(picked_markdown(None), elem_id="history-picked", elem_classes="small-note")
        with gr.Row():
            self.reuse = gr.Button("Reuse these settings", size="sm", elem_id="reuse", variant="secondary")
        self.seen = gr.State(None)  # the outputs folder's version this page's gallery shows
        self.poll = gr.Timer(POLL_SECONDS)

    def refresh_update(self):
        return gr.update(value=gallery_items(self.ctx.engine.outputs()))

    def tick(self, seen: str | None):
        """(gallery update, version now): the list re-read only when the outputs folder changed."""
        try:
            now = self.ctx.engine.outputs_version()
            if now is not None and now == seen:
                return gr.update(), seen
            return self.refresh_update(), now
        except (WanStackError, OSError) as e:  # a tick never raises into the page; the next one tries again
            log.warning("gallery refresh: %s", e)
            return gr.update(), seen

    def wire(self, model: Any, panel, rows_state: Any, pair_state: Any, report_state: Any, message: Any) -> None:
        ctx, engine = self.ctx, self.ctx.engine
        self.refresh.click(self.refresh_update, None, [self.gallery], **PRIVATE)
        self.poll.tick(self.tick, [self.seen], [self.gallery, self.seen], **PRIVATE)

        def shown() -> list[OutputView]:
            return [o for o in engine.outputs() if o.thumbnail]

        def on_pick(evt: gr.SelectData):
            items = shown()
            if evt.index is None or evt.index >= len(items):
                return None, picked_markdown(None)
            o = items[evt.index]
            return o.id, picked_markdown(o)

        self.gallery.select(on_pick, None, [self.picked_state, self.picked], **PRIVATE)

        settings_out = panel.settings_outputs()
        outs = [model, panel.prompt, panel.negative, panel.seed, rows_state, pair_state, message] + settings_out \
            + self.editor.outputs()

        def on_reuse(picked_id, report):
            items = shown()
            o = next((x for x in items if x.id == picked_id), items[0] if items else None)
            keep = {c: gr.update() for c in outs}
            if o is None or not o.settings:
                keep[message] = "⚠ no past run with settings to reuse yet; generate one first"
                return keep
            s = o.settings
            try:
                spec = ctx.spec_for(s.get("model", ""))
            except WanStackError as e:
                keep[message] = f"⚠ cannot reuse the settings of {o.id}: {e}"
                return keep
            rows = [{**sl.new_row(), **{k: v for k, v in e.items() if k in sl.ROW_FIELDS + ('sha256',)}}
                    for e in s.get("stack") or []]
            out = dict(zip(settings_out, panel.settings_updates(s["model"], spec)))
            resolution = next((k for k, wh in spec.resolutions.items() if wh == (s.get("width"), s.get("height"))), None)
            values = {panel.frames: s.get("frames"), panel.fps: s.get("fps"), panel.steps: s.get("steps"),
                      panel.guidance: s.get("guidance"), panel.guidance_2: s.get("guidance_2"),
                      panel.shift: s.get("shift"), panel.resolution: resolution}
            for comp, value in values.items():
                if value is not None:
                    base = out.get(comp)
                    out[comp] = {**base, "value": value} if isinstance(base, dict) else gr.update(value=value)
            out.update({model: s["model"], panel.prompt: s.get("prompt", ""),
                        panel.negative: s.get("negative_prompt") or "", panel.seed: s.get("seed", -1),
                        rows_state: rows, pair_state: None, message: ""})
            out.update(zip(self.editor.outputs(), self.editor.render(rows, spec, "", report)))
            return out

        self.reuse.click(on_reuse, [self.picked_state, report_state], outs, **PRIVATE)
