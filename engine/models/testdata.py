"""Tiny model files in the layouts people really download, written from WanStack's demo models.

`build_comfyui_tree(demo_folder, out)` writes a ComfyUI `models/` tree: transformers under original Wan
names (bare, `model.diffusion_model.` or `diffusion_model.` prefixed) in fp32/bf16/fp16, plain fp8 and
ComfyUI scaled fp8 (per-layer `scale_weight`/`scale_input` and the `scaled_fp8` marker), GGUF written with
`gguf`'s writer and quantizers, the umt5 text encoder in ComfyUI's T5 layout, the VAE in the original Wan
layout, a tokenizer/ next to the text encoder, and the demo LoRAs. Each file carries its demo config
(`wanstack_config` metadata), since a demo's head count or latent statistics cannot be read from weights.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from engine.models.keys import transformer_name_map, vae_name_map

_TO_WAN = [  # diffusers -> original Wan names; checked against diffusers' converter in to_wan_names()
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_out.0.", ".o."), (".to_q.", ".q."),
    (".to_k.", ".k."), (".to_v.", ".v."), (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("proj_out", "head.head"),
]


def to_wan_names(keys: list[str]) -> dict[str, str]:
    """diffusers transformer name -> original Wan name, verified to invert diffusers' own converter."""
    out = {}
    for k in keys:
        n = k
        for a, b in _TO_WAN:
            n = n.replace(a, b)
        n = re.sub(r"^scale_shift_table$", "head.modulation", n)
        n = re.sub(r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation", n)
        n = re.sub(r"\.norm2\.", ".@@.", n).replace(".norm3.", ".norm2.").replace(".@@.", ".norm3.")
        out[k] = n
    back = transformer_name_map(list(out.values()))
    if back != {k: v for k, v in out.items()}:
        wrong = sorted(set(back.items()) ^ set(out.items()))[:3]
        raise AssertionError(f"Wan names do not invert diffusers' converter: {wrong}")
    return out


def _save(tensors: dict, path: Path, config: dict) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"wanstack_config": json.dumps(config)})
    return path


def _config(module) -> dict:
    return {k: v for k, v in dict(module.config).items() if not k.startswith("_")}


def write_transformer(module, path: Path, storage: str = "bf16", prefix: str = "") -> Path:
    """One expert in original Wan names. storage: fp32 | bf16 | fp16 | fp8_e4m3fn | fp8_scaled | fp8_comfy_quant
    (ComfyUI's newer mixed-precision layout: `weight_scale`, `input_scale` and a `comfy_quant` JSON blob per layer,
    with the same scales as fp8_scaled) | int8 (a layout WanStack refuses: int8 weights, per-row scales)."""
    import torch

    from engine.models.fp8 import FP8_MAX

    sd = module.state_dict()
    names = to_wan_names(list(sd))
    out = {}
    cast = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    linear = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    for k, t in sd.items():
        name = prefix + names[k]
        t = t.detach().float()
        if storage in cast:
            out[name] = t.to(cast[storage])
        elif k in linear:
            base = name[: -len("weight")]
            if storage in ("fp8_scaled", "fp8_comfy_quant"):
                scale = (t.abs().max() / FP8_MAX).clamp(min=1e-12)
                out[name] = (t / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
                if storage == "fp8_scaled":
                    out[base + "scale_weight"] = scale.reshape(()).float()
                    out[base + "scale_input"] = torch.tensor(1.0)
                else:
                    out[base + "weight_scale"] = scale.reshape(()).float()
                    out[base + "input_scale"] = torch.tensor(1.0)
                    out[base + "comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
            elif storage == "int8":
                row = (t.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
                out[name] = (t / row).round().clamp(-127, 127).to(torch.int8)
                out[base + "weight_scale"] = row.float()
                out[base + "comfy_quant"] = torch.tensor(list(b'{"format": "int8_tensorwise"}'), dtype=torch.uint8)
            else:
                out[name] = t.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        else:
            out[name] = t.to(torch.float16)
    if storage == "fp8_scaled":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return _save(out, path, _config(module))


def write_gguf(module, path: Path, qtype: str = "Q8_0", small: int = 1024) -> Path:
    """One expert as city96/QuantStack write them: bare names, 2-D block weights quantized (ffn.2 raised to
    Q4_1/Q5_1 in Q4_0/Q5_0 files), small (<= `small` values)/1-D/modulation/5-D tensors F32, embeddings and
    head BF16. The demo's block weights are 32x32, so the builder lowers `small` to keep them quantized."""
    import gguf
    import numpy as np
    import torch

    sd = module.state_dict()
    names = to_wan_names(list(sd))
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="wan")
    writer.add_string("wanstack_config", json.dumps(_config(module)))
    q = gguf.GGMLQuantizationType[qtype]
    for k, t in sd.items():
        name = names[k]
        arr = t.detach().float().numpy()
        if arr.ndim == 1 or arr.size <= small or name.endswith("modulation") or arr.ndim == 5:
            writer.add_tensor(name, arr.astype(np.float32))
        elif name.startswith("blocks.") and arr.ndim == 2:
            qt = q
            if name.endswith("ffn.2.weight") and qtype in ("Q4_0", "Q5_0"):
                qt = gguf.GGMLQuantizationType[qtype[:2] + "_1"]
            try:
                data = gguf.quants.quantize(arr, qt)
            except NotImplementedError:  # gguf-py dequantizes K-quants but cannot quantize them
                data = _synthetic_blocks(arr.shape, qt)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
        else:
            bf = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(name, bf, raw_shape=bf.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    del torch
    return path


def _synthetic_blocks(shape: tuple[int, ...], qtype):
    """Valid blocks of a quant type gguf-py cannot write (the K-quants): seeded random bytes no larger than
    0x3B, so every fp16 block scale is finite and below 1. Tests compare against gguf's own dequantizer."""
    import gguf
    import numpy as np

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    if cols % block:
        raise ValueError(f"{qtype} needs rows of a multiple of {block} values, got {cols}")
    rng = np.random.default_rng(rows * 1_000_003 + cols)
    return rng.integers(0, 0x3C, size=(rows, cols // block * type_size), dtype=np.uint8)


def write_text_encoder(module, path: Path, storage: str = "fp32", layout: str = "comfy") -> Path:
    """umt5 in ComfyUI's T5 layout (no encoder.embed_tokens) or the original Wan layout; fp32/bf16/fp16, or fp8 as
    ComfyUI's files have it: the 2-D block weights fp8 (fp8_scaled: with a `scale_weight` each and the marker;
    fp8_e4m3fn: plain), the token embedding and norms fp16."""
    import torch

    from engine.models.fp8 import FP8_MAX

    sd = {k: v for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"}
    cast = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    out = {}
    for k, t in sd.items():
        t = t.detach().float()
        name = k
        if layout == "wan":
            name = _t5_to_wan(k)
        if storage in cast:
            out[name] = t.to(cast[storage])
        elif t.ndim == 2 and ".block." in k and storage == "fp8_e4m3fn":
            out[name] = t.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        elif t.ndim == 2 and ".block." in k:
            scale = (t.abs().max() / FP8_MAX).clamp(min=1e-12)
            out[name] = (t / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            out[name[: -len("weight")] + "scale_weight"] = scale.reshape(()).float()
        else:
            out[name] = t.to(torch.float16)
    if storage == "fp8_scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return _save(out, path, {k: v for k, v in module.config.to_dict().items() if not k.startswith("_")
                             and k not in ("transformers_version", "torch_dtype", "dtype")})


def _t5_to_wan(k: str) -> str:
    rules = [(r"^shared\.", "token_embedding."), (r"^encoder\.final_layer_norm\.", "norm."),
             (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
             (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.", r"blocks.\1.pos_embedding.embedding."),
             (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
             (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
             (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
             (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
             (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2.")]
    for pat, rep in rules:
        k = re.sub(pat, rep, k)
    return k


def write_vae(module, path: Path) -> Path:
    """The VAE in the original Wan layout (2.1 flat blocks, or 2.2 nested), fp32."""
    config = _config(module)
    sd = module.state_dict()
    names = vae_name_map(list(sd), config)
    return _save({names[k]: v.detach().float() for k, v in sd.items()}, path, config)


def write_image_encoder(module, processor, path: Path) -> Path:
    """The CLIP vision tower as ComfyUI's clip_vision_h.safetensors stores it (transformers names), fp32."""
    config = {k: v for k, v in module.config.to_dict().items() if not k.startswith("_")
              and k not in ("transformers_version", "torch_dtype", "dtype")}
    proc = {k: v for k, v in processor.to_dict().items() if not k.startswith("_") and k != "image_processor_type"}
    config["image_processor"] = proc
    return _save({(k if k.startswith("vision_model.") else f"vision_model.{k}"): v.detach().float()
                  for k, v in module.state_dict().items()}, path, config)


def build_comfyui_tree(demo_folder: str | Path, out: str | Path, *, storages=("fp32",), gguf_types=(),
                       prefixes=("",), loras_from: str | Path | None = None, te_storages=("fp32",),
                       vae_name: str | None = None) -> Path:
    """A ComfyUI-style models/ tree from a demo model folder; returns `out`."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    demo = Path(demo_folder)
    out = Path(out)
    marker = json.loads((demo / "wanstack_demo.json").read_text())
    arch = marker["arch"]
    dual = (demo / "transformer_2").is_dir()
    tag = {"wan2.2-t2v-a14b": "wan2.2_t2v_{e}14B", "wan2.2-i2v-a14b": "wan2.2_i2v_{e}14B",
           "wan2.2-ti2v-5b": "wan2.2_ti2v_5B", "wan2.1-t2v-1.3b": "wan2.1_t2v_1.3B", "wan2.1-t2v-14b": "wan2.1_t2v_14B",
           "wan2.1-i2v-14b": "wan2.1_i2v_480p_14B"}[arch]
    experts = [("transformer", "high_noise_"), ("transformer_2", "low_noise_")] if dual else [("transformer", "")]
    for comp, e in experts:
        module = WanTransformer3DModel.from_pretrained(demo, subfolder=comp, torch_dtype=torch.float32)
        for storage in storages:
            for prefix in prefixes:
                ptag = {"": "", "model.diffusion_model.": "_mdm", "diffusion_model.": "_dm"}[prefix]
                write_transformer(module, out / "diffusion_models" / f"{tag.format(e=e)}_{storage}{ptag}.safetensors",
                                  storage, prefix)
        for qtype in gguf_types:
            write_gguf(module, out / "unet" / f"{tag.format(e=e).replace('_14B', '-14B')}-{qtype}.gguf", qtype, small=256)
    te = UMT5EncoderModel.from_pretrained(demo, subfolder="text_encoder", torch_dtype=torch.float32)
    for storage in te_storages:
        write_text_encoder(te, out / "text_encoders" / f"umt5_xxl_{storage}.safetensors", storage)
    shutil.copytree(demo / "tokenizer", out / "text_encoders" / "tokenizer", dirs_exist_ok=True)
    vae = AutoencoderKLWan.from_pretrained(demo, subfolder="vae", torch_dtype=torch.float32)
    default_vae = "wan2.2_vae.safetensors" if arch == "wan2.2-ti2v-5b" else "wan_2.1_vae.safetensors"
    write_vae(vae, out / "vae" / (vae_name or default_vae))
    if (demo / "image_encoder").is_dir():
        from transformers import CLIPImageProcessor, CLIPVisionModel

        enc = CLIPVisionModel.from_pretrained(demo, subfolder="image_encoder", torch_dtype=torch.float32)
        proc = CLIPImageProcessor.from_pretrained(demo, subfolder="image_processor")
        write_image_encoder(enc, proc, out / "clip_vision" / "clip_vision_h.safetensors")
    if loras_from is not None and Path(loras_from).is_dir():
        shutil.copytree(loras_from, out / "loras", dirs_exist_ok=True)
    return out
