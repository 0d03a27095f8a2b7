"""Models: the catalog of types, detection of diffusers folders, and the sources beyond them: recipes, an
existing ComfyUI `models/` tree, and single files (bf16/fp16/fp32, fp8 and scaled fp8, GGUF) for the
transformer, text encoder and VAE; plus the tiny random-weight demo models and their LoRAs.

Submodules: `catalog` (model types and their figures), `detect` (diffusers folders, the model scan),
`demo`/`demo_loras` (tiny random-weight models), `experts` (a model's expert files and shapes), `headers` (tensor names/shapes without weights), `identify` (component kind, model type,
storage), `keys` (original Wan / ComfyUI names <-> diffusers names), `recipes` and `comfyui` (assembling
models), `load` (building a pipeline from a recipe), `fp8`, `testdata` (tiny files in the real layouts).
"""
