"""`import ui` (and building the page) must not load torch, diffusers, transformers, safetensors or NVML."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "safetensors", "pynvml", "accelerate")


def test_import_ui_loads_no_torch():
    code = (
        "import sys, ui, ui.layout, ui.stack_editor, ui.presets_panel, ui.generate, ui.api, engine.presets\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert 'gradio' in sys.modules\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


def test_ui_sources_do_not_import_heavy_modules():
    for path in (ROOT / "ui").glob("*.py"):
        text = path.read_text()
        for mod in HEAVY:
            assert f"import {mod}" not in text and f"from {mod}" not in text, f"{path.name} imports {mod}"
