"""Builders for the LoRA tests: tiny Wan transformers and LoRA files of every key family."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.lora.names import diffusers_to_wan

WIDTH = {"wan2.1-t2v-1.3b": 16, "wan2.2-ti2v-5b": 24, "wan2.1-t2v-14b": 32, "wan2.1-i2v-14b": 32, "wan2.2-t2v-a14b": 32}


def tiny_transformer(width: int = 16, in_channels: int = 16, image: bool = False, seed: int = 0, layers: int = 2):
    """The demo transformer shape (2 heads, ffn 32, text_dim 32), seeded."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=width // 2, in_channels=in_channels,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=32 if image else None,
        added_kv_proj_dim=width if image else None, rope_max_seq_len=64,
    ).eval()


def lora_targets(model) -> list[str]:
    """diffusers module names of every weight a LoRA can target (Linear and the patch Conv3d)."""
    out = []
    for name, p in model.named_parameters():
        if name.endswith(".weight") and p.ndim >= 2:
            out.append(name[: -len(".weight")])
    return out


def random_lowrank(model, rank: int = 4, seed: int = 1, targets=None):
    """{module: (down, up)} with shapes fitting `model` (conv: down [r,in,kt,kh,kw], up [out,r,1,1,1])."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = {}
    for mod in targets or lora_targets(model):
        w = params[mod + ".weight"]
        down = torch.randn((rank, *w.shape[1:]), generator=g) * 0.1
        up = torch.randn((w.shape[0], rank, *([1] * (w.ndim - 2))), generator=g) * 0.1
        out[mod] = (down, up)
    return out


def wan_name(mod: str) -> str:
    wan = diffusers_to_wan(mod)
    assert wan is not None, mod
    return wan


def write_lora(path: Path, family: str, lowrank: dict, alpha: float | None = None, prefix_2: bool = False) -> Path:
    """Write `lowrank` ({diffusers module: (down, up)}) in one key family."""
    sd = {}
    for mod, (down, up) in lowrank.items():
        if family == "peft":
            base = f"transformer.{mod}"
            sd[f"{base}.lora_A.weight"], sd[f"{base}.lora_B.weight"] = down, up
        elif family == "wan":
            base = f"{'diffusion_model_2' if prefix_2 else 'diffusion_model'}.{wan_name(mod)}"
            sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = down, up
        elif family == "kohya":
            base = "lora_unet_" + wan_name(mod).replace(".", "_")
            sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = down, up
        elif family == "kohya_transformer":
            base = ("lora_transformer_2_" if prefix_2 else "lora_transformer_") + mod.replace(".", "_")
            sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = down, up
        else:
            raise ValueError(family)
        if alpha is not None and family != "peft":
            sd[f"{base}.alpha"] = torch.tensor(alpha)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def write_two_expert(path: Path, high: dict, low: dict, family: str = "wan", alpha: float | None = None) -> Path:
    sd = {}
    for part, lowrank in ((False, high), (True, low)):
        tmp = path.with_suffix(f".{int(part)}.tmp")
        write_lora(tmp, family, lowrank, alpha=alpha, prefix_2=part)
        from safetensors.torch import load_file

        sd.update(load_file(str(tmp)))
        tmp.unlink()
    save_file(sd, str(path))
    return path


def lightx2v_diffs(model, seed: int = 2) -> dict[str, torch.Tensor]:
    """{diffusers param name: full diff} for every parameter (weights, biases, norms, modulation)."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=g) * 0.01 for name, p in model.named_parameters()}


def write_lightx2v(path: Path, diffs: dict[str, torch.Tensor]) -> Path:
    sd = {}
    for name, d in diffs.items():
        if name.endswith("scale_shift_table"):  # bare parameters: Wan `modulation`, `head.modulation`
            mod = name
            sd[f"diffusion_model.{wan_name(mod)}.diff_m"] = d
            continue
        mod, _, kind = name.rpartition(".")
        suffix = "diff" if kind == "weight" else "diff_b"
        sd[f"diffusion_model.{wan_name(mod)}.{suffix}"] = d
    save_file(sd, str(path))
    return path


def expected(model_state: dict, lowranks: list[tuple[dict, float, float]], diffs: list[tuple[dict, float]] = ()):
    """The formula W0 + sum w*scale*(B@A) (+ w*diff) in fp32, per parameter name."""
    out = {}
    for lowrank, w, scale in lowranks:
        for mod, (down, up) in lowrank.items():
            name = mod + ".weight"
            w0 = out.get(name, model_state[name].float())
            delta = (up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double()).reshape(w0.shape)
            out[name] = w0 + (w * scale * delta).float()
    for diff, w in diffs:
        for name, d in diff.items():
            w0 = out.get(name, model_state[name].float())
            out[name] = w0 + w * d.float()
    return out


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
