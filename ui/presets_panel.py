"""Named stacks: save, load (switching to the preset's model), rename, duplicate, delete (confirmed),
export (download) and import (.json or Wan2GP .lset). Every action goes through the engine's door and
reports in one line under the bar; nothing raises into Gradio's per-component error display."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from engine.types import WanStackError
from ui import stack_logic as sl
from ui.context import UIContext
from ui.stack_editor import PRIVATE, StackEditor

log = logging.getLogger(__name__)


class PresetsPanel:
    def __init__(self, ctx: UIContext, editor: StackEditor):
        self.ctx = ctx
        self.editor = editor
        self._export_dir = Path(tempfile.mkdtemp(prefix="wanstack-export-"))

    def choices(self) -> list[tuple[str, str]]:
        return [(f"{p.name} · {p.model_type}", p.name) for p in self.ctx.engine.presets()]

    def build(self):
        with gr.Row(equal_height=True, elem_id="preset-bar"):
            self.preset = gr.Dropdown(self.choices(), value=None, label="Saved stacks", scale=3, min_width=160,
                                      elem_id="preset-picker")
            self.load = gr.Button("Load stack", size="sm", scale=0, min_width=90, elem_id="preset-load")
            self.name = gr.Textbox(label="Save the stack as", scale=2, min_width=130,
                                   placeholder="e.g. Fast anime", elem_id="preset-name")
            self.save = gr.Button("Save stack", size="sm", scale=0, min_width=90, variant="primary",
                                  elem_id="preset-save")
        with gr.Accordion("More: rename, duplicate, delete, export, import", open=False, elem_id="preset-more"):
            with gr.Row(equal_height=True):
                self.rename = gr.Button("Rename picked stack to the name typed above", size="sm",
                                        elem_id="preset-rename")
                self.duplicate = gr.Button("Duplicate picked stack", size="sm", elem_id="preset-duplicate")
                self.delete = gr.Button("Delete picked stack…", size="sm", variant="stop", elem_id="preset-delete")
            with gr.Row(equal_height=True, visible=False, elem_id="preset-confirm") as self.confirm_row:
                self.confirm_text = gr.Markdown("", elem_id="preset-confirm-text")
                self.confirm = gr.Button("Yes, delete it", size="sm", variant="stop", elem_id="preset-confirm-delete")
                self.cancel = gr.Button("Keep it", size="sm", elem_id="preset-cancel-delete")
            with gr.Row(equal_height=True):
                self.export = gr.DownloadButton("Export picked stack (.json)", size="sm", value=None,
                                                elem_id="preset-export")
                self.upload = gr.UploadButton("Import .json or Wan2GP .lset", size="sm", file_types=[".json", ".lset"],
                                              type="filepath", elem_id="preset-import")
        self.status = gr.Markdown("", elem_id="preset-status", elem_classes="small-note")

    def wire(self, model: Any, rows_state: Any, report_state: Any, pair_state: Any, panel) -> None:
        """`panel`: the ModelPanel, whose model and settings a preset for another model switches."""
        ctx, engine = self.ctx, self.ctx.engine
        editor_out = [rows_state, pair_state] + self.editor.outputs()
        switch_out = [model] + panel.settings_outputs()
        bar_out = [self.preset, self.status, self.name]

        def spec_of(model_id):
            try:
                return ctx.spec_for(model_id) if model_id else None
            except WanStackError:
                return None

        def picker(value=None):
            names = [p.name for p in engine.presets()]
            return gr.update(choices=self.choices(), value=value if value in names else None)

        def problem(e: Exception) -> str:
            return f"⚠ {e}"

        keep_editor = [gr.update()] * len(editor_out)
        keep_switch = [gr.update()] * len(switch_out)

        def on_load(model_id, name, report):
            if not name:
                return keep_editor + keep_switch + ["⚠ pick a named stack to load", gr.update()]
            try:
                loaded = engine.load_preset(name, model_id)
            except WanStackError as e:
                return keep_editor + keep_switch + [problem(e), gr.update()]
            if loaded.model is None:
                return keep_editor + keep_switch + ["⚠ " + "; ".join(loaded.notes), gr.update()]
            spec = loaded.model.spec
            rows = [dict(r) for r in loaded.rows][: ctx.max_rows]
            message = "; ".join(loaded.notes)
            cap = sl.over_cap(rows, spec, engine.cap_problem)
            if cap:
                message = (message + "; " if message else "") + cap
            status = f"loaded **{name}** ({len(rows)} LoRA{'s' if len(rows) != 1 else ''})"
            if loaded.model.id != model_id:
                status += f" and switched to its model **{loaded.model.id}**"
                switch = [loaded.model.id] + panel.settings_updates(loaded.model.id, spec)
            else:
                switch = keep_switch
            switch, said = _with_preset_settings(list(switch), loaded.preset.settings, spec)
            if said:
                status += f"; it sets {said}"
            return [rows, None] + self.editor.render(rows, spec, message, report) + switch + [status, name]

        def on_save(model_id, name, rows, current):
            name = (name or "").strip() or current
            try:
                spec = spec_of(model_id)
                if spec is None:
                    return picker(current), "⚠ pick a model before saving a stack", gr.update()
                saved = engine.save_preset(name or "", spec.type, sl.to_stack(rows))
            except WanStackError as e:
                return gr.update(), problem(e), gr.update()
            return picker(saved.name), f"saved **{saved.name}** ({len(saved.entries)} LoRAs) to presets/", ""

        def on_rename(current, new):
            try:
                preset = engine.rename_preset(current or "", (new or "").strip())
            except WanStackError as e:
                return gr.update(), problem(e), gr.update()
            return picker(preset.name), f"renamed **{current}** to **{preset.name}**", ""

        def on_duplicate(current, new):
            try:
                preset = engine.duplicate_preset(current or "", (new or "").strip() or None)
            except WanStackError as e:
                return gr.update(), problem(e), gr.update()
            return picker(preset.name), f"duplicated as **{preset.name}**", ""

        def on_ask_delete(current):
            if not current:
                return gr.update(visible=False), "", "⚠ pick a named stack first"
            return gr.update(visible=True), f"Delete **{current}** from presets/? This cannot be undone.", ""

        def on_delete(current):
            hide = gr.update(visible=False)
            try:
                engine.delete_preset(current or "")
            except WanStackError as e:
                return hide, gr.update(), problem(e), gr.update()
            return hide, picker(None), f"deleted **{current}**", ""

        def on_pick(name):
            try:
                src = engine.export_preset(name) if name else None
            except WanStackError:
                src = None
            if src is None:
                return gr.update(value=None)
            # presets/ is not served (blocked_paths): hand the browser a copy from a temp folder
            dst = self._export_dir / src.name
            shutil.copyfile(src, dst)
            return gr.update(value=str(dst))

        def on_import(model_id, file, report):
            if not file:
                return keep_editor + [gr.update(), gr.update(), gr.update()]
            path = Path(file)
            spec = spec_of(model_id)
            try:
                preset = engine.import_preset(path.read_bytes(), path.name, spec.type if spec else None)
                loaded = engine.load_preset(preset.name, model_id)
            except (WanStackError, OSError) as e:
                return keep_editor + [gr.update(), problem(e), gr.update()]
            status = f"imported **{preset.name}** from {path.name}"
            if loaded.model is None or loaded.model.spec is None:
                return keep_editor + [picker(preset.name), status + "; " + "; ".join(loaded.notes), preset.name]
            rows = [dict(r) for r in loaded.rows][: ctx.max_rows]
            if loaded.model.id != model_id:
                status += f"; it is for {loaded.model.type}: press Load stack to switch to it"
                return keep_editor + [picker(preset.name), status, preset.name]
            return ([rows, None] + self.editor.render(rows, loaded.model.spec, "; ".join(loaded.notes), report)
                    + [picker(preset.name), status, preset.name])

        self.load.click(on_load, [model, self.preset, report_state], editor_out + switch_out + [self.status, self.name],
                        **PRIVATE)
        self.save.click(on_save, [model, self.name, rows_state, self.preset], bar_out, **PRIVATE)
        self.rename.click(on_rename, [self.preset, self.name], bar_out, **PRIVATE)
        self.duplicate.click(on_duplicate, [self.preset, self.name], bar_out, **PRIVATE)
        self.delete.click(on_ask_delete, [self.preset], [self.confirm_row, self.confirm_text, self.status], **PRIVATE)
        self.cancel.click(lambda: (gr.update(visible=False), "kept it"), None, [self.confirm_row, self.status], **PRIVATE)
        self.confirm.click(on_delete, [self.preset], [self.confirm_row] + bar_out, **PRIVATE)
        self.preset.change(on_pick, [self.preset], [self.export], **PRIVATE)
        self.upload.upload(on_import, [model, self.upload, report_state], editor_out + bar_out,
                           api_visibility="private", show_progress="hidden")


# Positions of steps, guidance, guidance_2 and shift in [model] + ModelPanel.settings_outputs().
_SETTING_SLOTS = {"steps": 6, "guidance": 7, "guidance_2": 8, "shift": 9}
_SETTING_NAMES = {"steps": "steps", "guidance": "guidance", "guidance_2": "low-noise guidance", "shift": "shift"}


def _with_preset_settings(switch: list, settings: dict, spec) -> tuple[list, str]:
    """A speed preset's steps/guidance/shift written into the Settings fields, and the sentence saying so."""
    said = []
    for key, slot in _SETTING_SLOTS.items():
        value = (settings or {}).get(key)
        if value is None or (key == "guidance_2" and not spec.dual_expert):
            continue
        switch[slot] = gr.update(value=value)
        said.append(f"{_SETTING_NAMES[key]} {value:g}")
    return switch, ", ".join(said)
