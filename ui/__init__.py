"""WanStack's Gradio UI: shows and edits; every computation goes through the engine facade.

Importing this package loads gradio but never torch, diffusers, transformers or safetensors.
"""
from ui.layout import CSS, THEME, build_ui

__all__ = ["build_ui", "CSS", "THEME"]
