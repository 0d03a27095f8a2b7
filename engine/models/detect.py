"""Find diffusers-layout Wan models in a folder and tell their model type from the configs.

Reads only small JSON files (model_index.json, transformer*/config.json): no weights, no torch.
A folder that is not a usable Wan model gets a reason, never an exception.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.models.catalog import CATALOG, DEMO_WIDTH

log = logging.getLogger(__name__)
DEMO_MARKER = "wanstack_demo.json"
_REAL_WIDTHS = {1536: "1.3b", 3072: "5b", 5120: "14b"}


@dataclass(frozen=True)
class ModelInfo:
    id: str  # the folder name, as the UI and API name it
    path: str
    type: str | None  # a catalog model type, or None when not recognised
    ok: bool
    reason: str = ""  # why it cannot be used (when not ok)
    demo: bool = False
    label: str = ""
    source: str = "diffusers"  # "diffusers", "recipe" (a JSON file in models/) or "comfyui" (assembled from --comfyui)
    storage: str = ""  # transformer storage: fp32, bf16, fp16, fp8_e4m3fn, fp8_scaled, gguf-Q4_K, ...
    storage_label: str = ""  # what the model picker shows next to the name: "fp8 scaled · 2 experts"
    files: dict = field(default_factory=dict)  # component -> file or folder it is loaded from

    def to_dict(self) -> dict:
        return asdict(self)


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def _has(index: dict, name: str) -> bool:
    value = index.get(name)
    return isinstance(value, list) and len(value) == 2 and value[0] is not None


def classify(index: dict, tconfig: dict, has_expert_2: bool) -> str:
    """Model type from model_index.json and the transformer config. Raises ValueError with the reason."""
    in_ch = tconfig.get("in_channels")
    width = int(tconfig.get("num_attention_heads", 0)) * int(tconfig.get("attention_head_dim", 0))
    expand = bool(index.get("expand_timesteps")) or in_ch == 48
    if has_expert_2:
        if in_ch == 16:
            arch = "wan2.2-t2v-a14b"
        elif in_ch == 36:
            arch = "wan2.2-i2v-a14b"
        else:
            raise ValueError(f"two experts with in_channels {in_ch}: not a Wan2.2 A14B layout (expected 16 or 36)")
    elif expand:
        arch = "wan2.2-ti2v-5b"
    elif in_ch == 36:
        arch = "wan2.1-i2v-14b"
    elif in_ch == 16:
        if width == 1536 or width == DEMO_WIDTH[1536]:
            arch = "wan2.1-t2v-1.3b"
        else:
            arch = "wan2.1-t2v-14b"
    else:
        raise ValueError(f"transformer in_channels {in_ch} matches no Wan model (16 T2V, 36 I2V, 48 TI2V)")
    if width in _REAL_WIDTHS:
        expected = CATALOG[arch].memory.width
        if width != expected:
            raise ValueError(f"transformer width {width} does not fit {arch} (expected {expected})")
    return arch


def detect(folder: str | Path) -> ModelInfo:
    folder = Path(folder)
    name = folder.name
    index_path = folder / "model_index.json"
    try:
        if not index_path.is_file():
            return ModelInfo(name, str(folder), None, False, "no model_index.json: not a diffusers-layout model folder")
        index = _read_json(index_path)
        cls = index.get("_class_name", "")
        if cls not in ("WanPipeline", "WanImageToVideoPipeline"):
            return ModelInfo(name, str(folder), None, False, f"pipeline {cls or 'unknown'} is not a Wan T2V/I2V pipeline")
        if not _has(index, "transformer"):
            return ModelInfo(name, str(folder), None, False, "model_index.json lists no transformer")
        for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
            if _has(index, part) and not (folder / part).is_dir():
                return ModelInfo(name, str(folder), None, False, f"component folder {part}/ is missing")
        tconfig = _read_json(folder / "transformer" / "config.json")
        has_2 = _has(index, "transformer_2")
        arch = classify(index, tconfig, has_2)
        demo = (folder / DEMO_MARKER).is_file()
        model_type = f"demo-{arch}" if demo else arch
        weights = list((folder / "transformer").glob("*.safetensors"))
        if not weights:
            return ModelInfo(name, str(folder), model_type, False, "transformer/ has no .safetensors weights", demo)
        storage = _folder_storage(folder / "transformer")
        experts = 2 if has_2 else 1
        from engine.models.identify import storage_label

        files = {part: str(folder / part) for part in ("transformer", "transformer_2", "text_encoder", "vae", "tokenizer",
                                                         "image_encoder") if _has(index, part)}
        return ModelInfo(name, str(folder), model_type, True, "", demo, CATALOG[model_type].label, "diffusers", storage,
                         storage_label(storage, experts), files)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return ModelInfo(name, str(folder), None, False, f"unreadable: {e}")


def _folder_storage(component: Path) -> str:
    """The dtype most of a diffusers component's weights are stored in (from one shard's header)."""
    from collections import Counter

    from engine.lora.errors import LoraFormatError
    from engine.lora.files import read_safetensors_header

    shards = sorted(component.glob("*.safetensors"))
    if not shards:
        return ""
    try:
        header, _ = read_safetensors_header(shards[0])
    except (LoraFormatError, OSError):
        return ""
    counts = Counter(v["dtype"] for k, v in header.items() if k != "__metadata__")
    code = counts.most_common(1)[0][0] if counts else ""
    return {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F8_E4M3": "fp8_e4m3fn"}.get(code, code.lower())


def scan(models_dir: str | Path, comfyui_dir: str | Path | None = None) -> list[ModelInfo]:
    """Every sub-folder and recipe (*.json with a `transformer`) of models_dir, sorted by name, then the
    models assembled from a ComfyUI `models/` folder when one is given."""
    root = Path(models_dir)
    found = []
    if root.is_dir():
        from engine.models.recipes import is_recipe_file, recipe_info

        for child in sorted(root.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir():
                found.append(detect(child))
            elif child.suffix == ".json" and is_recipe_file(child):
                found.append(recipe_info(child, models_dir=root, comfyui_dir=comfyui_dir))
    if comfyui_dir is not None:
        from engine.models.comfyui import scan_comfyui

        found += scan_comfyui(comfyui_dir, models_dir=root if root.is_dir() else None)
    return found
