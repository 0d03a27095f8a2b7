"""WanStack engine: models, LoRA stacks, memory policy and generation. No gradio here.

Importing this package is cheap: no torch device query, no NVML init, no model load.
Heavy modules are imported where they are used.
"""
