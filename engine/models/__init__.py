"""Model sources beyond diffusers folders: recipes, an existing ComfyUI `models/` tree, and single files
(bf16/fp16/fp32, fp8 and scaled fp8, GGUF) for the transformer, text encoder and VAE.

Submodules: `headers` (tensor names/shapes without weights), `identify` (component kind, model type,
storage), `keys` (original Wan / ComfyUI names <-> diffusers names), `recipes` and `comfyui` (assembling
models), `load` (building a pipeline from a recipe), `fp8`, `testdata` (tiny files in the real layouts).
"""
