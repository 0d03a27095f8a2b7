"""Small seeded LoRA files for the demo models, one per on-disk format family, written with safetensors.

They let a newcomer try stacks, caps, high/low pairs and presets without downloading anything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from engine.fileio import atomic_path
from engine.lora.names import diffusers_to_wan

# file name -> (demo arch, format, rank, experts, trigger words)
DEMO_LORAS = {
    "demo/style-peft.safetensors": ("wan2.1-t2v-1.3b", "peft", 4, ("single",), ["demostyle"]),
    "demo/motion-comfy.safetensors": ("wan2.1-t2v-1.3b", "comfy", 8, ("single",), []),
    "demo/detail-kohya.safetensors": ("wan2.1-t2v-1.3b", "kohya", 4, ("single",), ["crisp detail"]),
    "demo/reward-diff.safetensors": ("wan2.1-t2v-1.3b", "diff", 0, ("single",), []),
    "demo/speed_high_noise.safetensors": ("wan2.2-t2v-a14b", "comfy", 4, ("high",), []),
    "demo/speed_low_noise.safetensors": ("wan2.2-t2v-a14b", "comfy", 4, ("low",), []),
    "demo/anime-a14b-peft.safetensors": ("wan2.2-t2v-a14b", "peft", 4, ("single",), ["anime style"]),
    "demo/twoexpert-a14b.safetensors": ("wan2.2-t2v-a14b", "comfy", 4, ("high", "low"), []),
}


def _linear_shapes(transformer) -> dict[str, tuple[int, int]]:
    import torch

    return {
        name: (m.out_features, m.in_features)
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks.")
    }


def _tensors(shapes, fmt: str, rank: int, prefix: str, gen) -> dict:
    import torch

    out = {}
    for name, (n_out, n_in) in shapes.items():
        wan = diffusers_to_wan(name)
        if fmt == "diff":
            out[f"{prefix}.{wan}.diff"] = torch.randn(n_out, n_in, generator=gen) * 0.05
            out[f"{prefix}.{wan}.diff_b"] = torch.randn(n_out, generator=gen) * 0.05
            continue
        down = torch.randn(rank, n_in, generator=gen) * 0.3
        up = torch.randn(n_out, rank, generator=gen) * 0.3
        if fmt == "peft":
            out[f"transformer.{name}.lora_A.weight"] = down
            out[f"transformer.{name}.lora_B.weight"] = up
        else:
            base = f"{prefix}.{wan}" if fmt == "comfy" else "lora_unet_" + wan.replace(".", "_")
            out[f"{base}.lora_down.weight"] = down
            out[f"{base}.lora_up.weight"] = up
            out[f"{base}.alpha"] = torch.tensor(float(rank))
    return out


def write_demo_loras(loras_dir: str | os.PathLike, transformers_by_arch: dict, seed: int = 0) -> list[Path]:
    """Write the demo LoRAs whose architecture is in `transformers_by_arch` (arch -> transformer module).

    Existing files are left alone, so a user's edits survive a second run.
    """
    import torch
    from safetensors.torch import save_file

    written = []
    for i, (rel, (arch, fmt, rank, experts, triggers)) in enumerate(sorted(DEMO_LORAS.items())):
        if arch not in transformers_by_arch:
            continue
        path = Path(loras_dir) / rel
        if path.exists():
            continue
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        shapes = _linear_shapes(transformers_by_arch[arch])
        tensors = {}
        for expert in experts:
            prefix = "diffusion_model_2" if expert == "low" and len(experts) == 2 else "diffusion_model"
            tensors.update(_tensors(shapes, fmt, rank, prefix, gen))
        meta = {"wanstack_demo": "true", "ss_base_model_version": f"demo-{arch}"}
        if triggers:
            meta["ss_tag_frequency"] = json.dumps({"demo": {t: 10 for t in triggers}})
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
            os.chmod(tmp, 0o644)
        written.append(path)
    return written
