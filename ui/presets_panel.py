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
        # The preset whose settings are on the page: {"name", "model", "applied": settings loading put there}.
        self.loaded = gr.State(None)

    def wire(self, model: Any, rows_state: Any, report_state: Any, pair_state: Any, panel) -> None:
        """`panel`: the ModelPanel, whose model and settings a preset for another model switches."""
        ctx, engine = self.ctx, self.ctx.engine
        editor_out = [rows_state, pair_state] + self.editor.outputs()
        switch_out = [model] + panel.settings_outputs()
        bar_out = [self.preset, self.status, self.name]
        page_settings = [panel.steps, panel.guidance, panel.guidance_2, panel.shift]

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
                return keep_editor + keep_switch + ["⚠ pick a named stack to load", gr.update(), gr.update()]
            try:
                loaded = engine.load_preset(name, model_id)
            except WanStackError as e:
                return keep_editor + keep_switch + [problem(e), gr.update(), gr.update()]
            if loaded.model is None:
                return keep_editor + keep_switch + ["⚠ " + "; ".join(loaded.notes), gr.update(), gr.update()]
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
            on_page = {"name": loaded.preset.name, "model": loaded.model.id,
                       "applied": applied_settings(loaded.preset.settings, spec)}
            return [rows, None] + self.editor.render(rows, spec, message, report) + switch + [status, name, on_page]

        def on_save(model_id, name, rows, current, on_page, *values):
            name = (name or "").strip() or current
            page = dict(zip(_SETTING_SLOTS, values))
            try:
                spec = spec_of(model_id)
                if spec is None:
                    return picker(current), "⚠ pick a model before saving a stack", gr.update(), gr.update()
                target = next((p for p in engine.presets() if p.name == name), None)
                settings = settings_to_save(on_page, model_id, name, page, target.settings if target else None)
                saved = engine.save_preset(name or "", spec.type, sl.to_stack(rows), settings=settings)
            except WanStackError as e:
                return gr.update(), problem(e), gr.update(), gr.update()
            n = len(saved.entries)
            status = f"saved **{saved.name}** ({n} LoRA{'s' if n != 1 else ''}) to presets/"
            said = describe_settings(saved.settings, spec)
            if said:
                status += f"; it sets {said}"
            # From now on the page is measured against what was just saved (only where the page shows it).
            on_page = {"name": saved.name, "model": model_id,
                       "applied": {k: v for k, v in saved.settings.items() if page.get(k) == v}}
            return picker(saved.name), status, "", on_page

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
            said = describe_settings(loaded.preset.settings, loaded.model.spec)
            if said:  # an import fills the stack only; Load also writes the preset's settings into the page
                status += f"; it also sets {said}: press Load stack to put those in Settings"
            return ([rows, None] + self.editor.render(rows, loaded.model.spec, "; ".join(loaded.notes), report)
                    + [picker(preset.name), status, preset.name])

        self.load.click(on_load, [model, self.preset, report_state],
                        editor_out + switch_out + [self.status, self.name, self.loaded], **PRIVATE)
        self.save.click(on_save, [model, self.name, rows_state, self.preset, self.loaded] + page_settings,
                        bar_out + [self.loaded], **PRIVATE)
        # Picking a model or rescanning puts the model's defaults in the settings: no preset's settings are on
        # the page any more (an import fills the stack only).
        for event in (model.input, panel.rescan.click, self.upload.upload):
            event(lambda: None, None, [self.loaded], **PRIVATE)
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


def applied_settings(settings: dict | None, spec) -> dict[str, Any]:
    """The settings of a preset that loading it writes into the page's fields (a one-expert model has no
    low-noise guidance)."""
    return {key: settings[key] for key in _SETTING_SLOTS
            if (settings or {}).get(key) is not None and (key != "guidance_2" or spec.dual_expert)}


def describe_settings(settings: dict | None, spec) -> str:
    """'steps 4, guidance 1, shift 5': the settings that act on `spec`'s runs, as the status line says them."""
    return ", ".join(f"{_SETTING_NAMES[k]} {v:g}" for k, v in applied_settings(settings, spec).items())


def _with_preset_settings(switch: list, settings: dict, spec) -> tuple[list, str]:
    """A speed preset's steps/guidance/shift written into the Settings fields, and the sentence saying so."""
    for key, value in applied_settings(settings, spec).items():
        switch[_SETTING_SLOTS[key]] = gr.update(value=value)
    return switch, describe_settings(settings, spec)


def settings_to_save(on_page: dict | None, model_id: str | None, name: str, page: dict[str, Any],
                     target: dict | None) -> dict[str, Any] | None:
    """The run settings to save with a stack named `name`, or None to keep those of the preset it overwrites.

    `on_page`: the preset whose settings loading put on the page (its name, model and the values it wrote),
    None when none is there (nothing loaded, or a model pick or rescan has put the model's defaults back).
    `page`: the steps / guidance / guidance_2 / shift fields now. `target`: the settings of the preset being
    overwritten (None for a new name).

    - Saved over the preset that was loaded: its settings stay, except those the user changed, i.e. the
      fields that now differ from what loading wrote there (an emptied field is no change).
    - Saved under another name: the loaded preset's settings, as the page shows them now, go with the
      stack (over the target's other settings).
    - Nothing loaded (or another model picked since): the target keeps its own settings; the page's
      fields are the model's defaults, not the preset's.
    """
    if not on_page or on_page.get("model") != model_id or not on_page.get("applied"):
        return None
    applied = on_page["applied"]
    now = {k: page[k] for k in applied if page.get(k) is not None}
    if name == on_page.get("name") and target is not None:
        changed = {k: v for k, v in now.items() if v != applied[k]}
        return {**target, **changed} if changed else None
    return {**(target or {}), **now}
