"""Named stacks: save, load, rename, duplicate, delete, export (download) and import (.json or Wan2GP .lset)."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from engine.presets import MAX_PRESET_BYTES, Preset, PresetError
from engine.types import RequestError
from ui import stack_logic as sl
from ui.context import UIContext
from ui.stack_editor import PRIVATE, StackEditor

log = logging.getLogger(__name__)


class PresetsPanel:
    def __init__(self, ctx: UIContext, editor: StackEditor):
        self.ctx = ctx
        self.editor = editor
        self._export_dir = Path(tempfile.mkdtemp(prefix="wanstack-export-"))

    def build(self):
        with gr.Row(equal_height=True, elem_id="preset-bar"):
            self.preset = gr.Dropdown(self.ctx.preset_choices(), value=None, label="Named stack", show_label=False,
                                      container=False, scale=3, min_width=140, elem_id="preset-picker")
            self.load = gr.Button("Load", size="sm", scale=0, min_width=56, elem_id="preset-load")
            self.name = gr.Textbox(show_label=False, container=False, placeholder="save as: name", scale=2,
                                   min_width=110, elem_id="preset-name")
            self.save = gr.Button("Save", size="sm", scale=0, min_width=56, variant="primary", elem_id="preset-save")
        with gr.Accordion("More preset actions", open=False, elem_id="preset-more"):
            with gr.Row(equal_height=True):
                self.rename = gr.Button("Rename to name", size="sm", elem_id="preset-rename")
                self.duplicate = gr.Button("Duplicate", size="sm", elem_id="preset-duplicate")
                self.delete = gr.Button("Delete", size="sm", variant="stop", elem_id="preset-delete")
                self.export = gr.DownloadButton("Export", size="sm", value=None, elem_id="preset-export")
                self.upload = gr.UploadButton("Import .json / .lset", size="sm", file_types=[".json", ".lset"],
                                              type="filepath", elem_id="preset-import")
        self.status = gr.Markdown("", elem_id="preset-status", elem_classes="small-note")

    def wire(self, model: Any, rows_state: Any, report_state: Any, pair_state: Any) -> None:
        ctx = self.ctx
        editor_out = [rows_state, pair_state] + self.editor.outputs()

        def spec_of(model_id):
            return ctx.spec_for(model_id) if model_id else None

        def known(name):
            """Names come from the browser: act only on presets the store itself lists."""
            if not name or name not in ctx.store.names():
                raise gr.Error(f"pick a saved preset first (got {name!r})")
            return name

        def picker(value=None):
            names = ctx.store.names()
            return gr.update(choices=ctx.preset_choices(), value=value if value in names else None)

        def on_load(model_id, name, report):
            if not name:
                raise gr.Error("pick a named stack to load")
            try:
                spec = spec_of(model_id)
                rows, notes = ctx.preset_rows(name, spec)
            except RequestError as e:
                raise gr.Error(str(e)) from None
            message = "; ".join(notes)
            status = f"loaded **{name}** ({len(rows)} LoRA{'s' if len(rows) != 1 else ''})"
            rows = rows[: ctx.max_rows]
            cap = sl.over_cap(rows, spec)
            if cap:
                message = (message + "; " if message else "") + cap
            return [rows, None] + self.editor.render(rows, spec, message, report) + [status, name]

        def on_save(model_id, name, rows, current):
            name = (name or "").strip() or current
            try:
                spec = spec_of(model_id)
                if spec is None:
                    raise RequestError("pick a model before saving a stack")
                stack = sl.to_stack(rows)
                entries = []
                for e in stack.entries:
                    d = e.to_dict()
                    info = ctx.lora_info(spec.type, e.file)
                    if info and info.get("sha256"):
                        d["sha256"] = info["sha256"]
                    entries.append(d)
                old = ctx.store.load(name) if name and ctx.store.exists(name) else None
                ctx.store.save(Preset(name or "", spec.type, entries, old.notes if old else ""))
            except RequestError as e:
                raise gr.Error(str(e)) from None
            saved = ctx.store.load(name).name
            return picker(saved), f"saved **{saved}** ({len(entries)} LoRAs) to presets/", ""

        def on_rename(current, new):
            try:
                preset = ctx.store.rename(known(current), new or "")
            except RequestError as e:
                raise gr.Error(str(e)) from None
            return picker(preset.name), f"renamed **{current}** to **{preset.name}**", ""

        def on_duplicate(current, new):
            try:
                preset = ctx.store.duplicate(known(current), (new or "").strip() or None)
            except RequestError as e:
                raise gr.Error(str(e)) from None
            return picker(preset.name), f"duplicated as **{preset.name}**", ""

        def on_delete(current):
            try:
                ctx.store.delete(known(current))
            except RequestError as e:
                raise gr.Error(str(e)) from None
            return picker(None), f"deleted **{current}**", ""

        def on_pick(name):
            if not name or name not in ctx.store.names():
                return gr.update(value=None)
            # presets/ is not served (blocked_paths): hand the browser a copy from a temp folder
            src = ctx.store.export_path(name)
            dst = self._export_dir / src.name
            shutil.copyfile(src, dst)
            return gr.update(value=str(dst))

        def on_import(model_id, file, report):
            if not file:
                return [gr.update()] * (len(editor_out)) + [gr.update(), gr.update(), gr.update()]
            path = Path(file)
            try:
                if path.stat().st_size > MAX_PRESET_BYTES:
                    raise PresetError(f"{path.name} is {path.stat().st_size} bytes; a preset is under {MAX_PRESET_BYTES}")
                spec = spec_of(model_id)
                files = ctx.lora_files(spec.type) if spec else []
                preset = ctx.store.import_bytes(path.read_bytes(), path.name, spec.type if spec else None, files)
                rows, notes = ctx.preset_rows(preset.name, spec)
            except RequestError as e:
                raise gr.Error(str(e)) from None
            message = "; ".join(notes)
            rows = rows[: ctx.max_rows]
            return ([rows, None] + self.editor.render(rows, spec, message, report)
                    + [picker(preset.name), f"imported **{preset.name}** from {path.name}", preset.name])

        self.load.click(on_load, [model, self.preset, report_state], editor_out + [self.status, self.name], **PRIVATE)
        self.save.click(on_save, [model, self.name, rows_state, self.preset], [self.preset, self.status, self.name], **PRIVATE)
        self.rename.click(on_rename, [self.preset, self.name], [self.preset, self.status, self.name], **PRIVATE)
        self.duplicate.click(on_duplicate, [self.preset, self.name], [self.preset, self.status, self.name], **PRIVATE)
        self.delete.click(on_delete, [self.preset], [self.preset, self.status, self.name], **PRIVATE)
        self.preset.change(on_pick, [self.preset], [self.export], **PRIVATE)
        self.upload.upload(on_import, [model, self.upload, report_state],
                           editor_out + [self.preset, self.status, self.name], api_visibility="private",
                           show_progress="hidden")
