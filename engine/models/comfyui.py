"""`--comfyui DIR`: an existing ComfyUI `models/` folder, assembled into models without converting anything.

Reads diffusion_models/ (or the older unet/), text_encoders/ (or clip/), vae/, clip_vision/ and loras/;
pairs Wan2.2 `high_noise`/`low_noise` experts by name and picks the text encoder and VAE that fit the type.
"""
from __future__ import annotations

import re
from pathlib import Path

from engine.models.headers import WEIGHT_SUFFIXES
from engine.models.identify import CLIP_VISION, TEXT_ENCODER, TRANSFORMER, VAE, classify_file
from engine.models.recipes import Pool, assemble, diffusers_pool, part_of_file
from engine.types import RequestError

FOLDERS = {"transformer": ("diffusion_models", "unet"), "text_encoder": ("text_encoders", "clip"),
           "vae": ("vae",), "image_encoder": ("clip_vision",), "loras": ("loras",)}


def _files(root: Path, kind: str) -> list[Path]:
    out: list[Path] = []
    for sub in FOLDERS[kind]:
        folder = root / sub
        if folder.is_dir():
            out += sorted(p for p in folder.rglob("*") if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file()
                          and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return out


def check_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise RequestError(f"--comfyui {root} is not a folder; point it at ComfyUI's models/ folder")
    if not any((root / sub).is_dir() for subs in FOLDERS.values() for sub in subs):
        raise RequestError(f"--comfyui {root} has none of diffusion_models/, unet/, text_encoders/, vae/, loras/; "
                           "point it at ComfyUI's models/ folder (e.g. ComfyUI/models)")
    return root


def lora_dir(root: str | Path) -> Path | None:
    folder = Path(root) / "loras"
    return folder if folder.is_dir() else None


def comfyui_pool(root: Path) -> Pool:
    pool = Pool(where=f"{root}/text_encoders/")
    for path in _files(root, "text_encoder"):
        kind = classify_file(path)
        if kind.kind == TEXT_ENCODER and not kind.reason:
            pool.text_encoders.append(part_of_file(path, kind, str(root)))
    for path in _files(root, "vae"):
        kind = classify_file(path)
        if kind.kind == VAE and not kind.reason:
            pool.vaes.append(part_of_file(path, kind, str(root)))
    for path in _files(root, "image_encoder"):
        kind = classify_file(path)
        if kind.kind == CLIP_VISION and not kind.reason:
            pool.image_encoders.append(part_of_file(path, kind, str(root)))
    return pool


def _pair_key(name: str) -> str:
    stem = Path(name).stem
    return re.sub(r"[_\-.]?(high|low)[_\- ]?noise|[_\-.](high|low)(?=[_\-.]|$)", "", stem, flags=re.I)


def scan_comfyui(root: str | Path, models_dir: Path | None = None) -> list:
    """ModelInfo (source "comfyui") for every model that the tree's transformer files make, usable or not."""
    from engine.models.detect import ModelInfo

    root = check_root(root)
    pools = [comfyui_pool(root), diffusers_pool(models_dir)]
    out = []
    kinds = [(p, classify_file(p)) for p in _files(root, "transformer")]
    experts: dict[tuple, dict[str, Path]] = {}
    for path, kind in kinds:
        if kind.kind != TRANSFORMER or kind.reason or kind.arch is None:
            reason = kind.reason or f"{path.name} is not a Wan transformer ({kind.kind})"
            out.append(ModelInfo(path.stem, str(path), None, False, reason, source="comfyui", storage=kind.storage,
                                 files={"transformer": str(path)}))
            continue
        if kind.arch in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"):
            experts.setdefault((kind.arch, kind.demo, str(path.parent), _pair_key(path.name), kind.storage), {})[
                kind.expert or "high_noise"] = path
            continue
        out.append(assemble(path.stem, "comfyui", str(path), {"transformer": str(path)}, None, pools))
    for (arch, demo, _folder, key, _storage), pair in experts.items():
        high, low = pair.get("high_noise"), pair.get("low_noise")
        first = high or low
        model_id = key if (high and low) else first.stem
        parts = {"transformer": str(first)}
        if high and low:
            parts["transformer_2"] = str(low)
        out.append(assemble(model_id, "comfyui", str(first), parts, None, pools))
    out.sort(key=lambda m: m.id)
    return out
