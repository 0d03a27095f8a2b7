"""Import hygiene: `import engine` does no device or NVML work; engine never imports gradio."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import importlib, pkgutil, sys
import engine
light = ["engine", "engine.types", "engine.models.catalog", "engine.facade", "engine.models.detect", "engine.run.request",
         "engine.run.generate", "engine.__main__"]
for name in light:
    importlib.import_module(name)
assert "torch" not in sys.modules, "light engine modules imported torch"
for m in pkgutil.walk_packages(engine.__path__, "engine."):
    importlib.import_module(m.name)
assert "gradio" not in sys.modules, "engine imported gradio"
import torch
assert not torch.cuda.is_initialized(), "importing engine initialised CUDA"
nv = sys.modules.get("pynvml")
assert nv is None or getattr(nv, "nvmlLib", None) is None, "importing engine initialised NVML"
print("clean")
"""


def test_importing_the_engine_touches_no_device_nvml_or_gradio():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"
