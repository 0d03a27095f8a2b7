"""`import ui` (and building the page) must not load torch, diffusers, transformers, safetensors or NVML,
and `ui/` reaches the engine only through its door: engine.facade, engine.port and engine.types."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "safetensors", "pynvml", "accelerate")
DOOR = {"engine", "engine.facade", "engine.port", "engine.types"}


def test_import_ui_loads_no_torch():
    code = (
        "import sys, ui, ui.layout, ui.stack_editor, ui.presets_panel, ui.generate, ui.api, ui.gallery, ui.tools_tab\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert 'gradio' in sys.modules\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


def _imports(path: Path) -> list[str]:
    """Every module a source file imports, at any depth (function-level imports included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names if node.module == "engine"]
    return names


def test_ui_imports_only_the_engines_door():
    files = sorted((ROOT / "ui").glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in HEAVY, f"{path.name} imports {name}"
            if top == "engine":
                assert name in DOOR, f"{path.name} imports {name}; ui/ may only use {sorted(DOOR)}"


def test_the_door_check_catches_a_side_door(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from engine.presets import PresetStore\n    from engine import memory\n"
                   "    from engine.models import catalog\n")
    assert [n for n in _imports(bad) if n not in DOOR] == ["engine.presets", "engine.memory", "engine.models"]
