"""A listed model's experts as files: where each expert's weights are and their parameter shapes under
diffusers names, read from headers only (no weights). Works for every model source: a diffusers folder's
transformer/ and transformer_2/, and a recipe's or `--comfyui` model's single files (.safetensors in any
storage and key layout, .gguf), so LoRA inspection and baking treat them alike.
"""
from __future__ import annotations

from pathlib import Path

from engine.models.catalog import EXPERT_COMPONENT, get_spec
from engine.types import RequestError


def expert_paths(info) -> dict[str, Path]:
    """expert ("high_noise"/"low_noise"/"main") -> its component folder or single file, for a usable ModelInfo."""
    if not info.ok or not info.type:
        raise RequestError(f"model {info.id}: {info.reason or 'not a usable Wan model'}")
    spec = get_spec(info.type)
    out = {}
    for expert in spec.experts:
        component = EXPERT_COMPONENT[expert]
        path = info.files.get(component) or (Path(info.path) / component if info.source == "diffusers" else None)
        if path is None:
            raise RequestError(f"model {info.id} names no {component}")
        out[expert] = Path(path)
    return out


def file_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Diffusers parameter name -> shape of one transformer: a diffusers folder or a single file."""
    path = Path(path)
    if path.is_dir():
        from engine.lora.merge import model_param_shapes

        return model_param_shapes(path)
    from engine.models.headers import read_header
    from engine.models.keys import transformer_name_map

    header = read_header(path)
    names = transformer_name_map(header.names())
    return {name: tuple(header.tensors[key].shape) for name, key in names.items()}


def expert_shapes(info) -> dict[str, dict[str, tuple[int, ...]]]:
    """expert -> {diffusers parameter name: shape} for a listed model of any source."""
    return {expert: file_shapes(path) for expert, path in expert_paths(info).items()}
