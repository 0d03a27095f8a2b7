"""Tensor names of single model files <-> diffusers / transformers parameter names.

- Transformer: ComfyUI and Wan2GP files use the original Wan names, bare or under `model.diffusion_model.` /
  `diffusion_model.`; diffusers' own `convert_wan_transformer_to_diffusers` does the renaming (it is applied
  to the names only, so no tensor is touched).
- VAE: diffusers 0.42's converter hard-codes the released 2.1 VAE's block indices and knows no 2.2 VAE, so
  the map here is derived from the VAE config (block counts, residual 2.2 layout).
- Text encoder: ComfyUI's umt5 uses transformers' T5 names without `encoder.embed_tokens`; the original
  Wan layout (`token_embedding`, `blocks.N.attn.q`, ...) is mapped too.
"""
from __future__ import annotations

import re

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# Quantization side tensors, not parameters: ComfyUI's scaled fp8 (`scale_weight`, `scale_input`, the `scaled_fp8`
# marker) and its newer mixed-precision layout (`weight_scale`, `input_scale`, a per-layer `comfy_quant` JSON blob
# naming the format; QUANTIZATION.md in ComfyUI), whose other formats add `weight_scale_2` / `pre_quant_scale`.
SCALE_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".weight_scale_2",
                  ".pre_quant_scale", ".comfy_quant")
MARKER = "scaled_fp8"


def scale_key_of(weight_key: str, names) -> str | None:
    """The per-tensor fp8 scale stored for `weight_key` (`X.weight`): ComfyUI's `X.scale_weight`, or the newer
    `X.weight_scale`; None when the file has neither."""
    if not weight_key.endswith("weight"):
        return None
    for key in (weight_key[: -len("weight")] + "scale_weight", weight_key + "_scale"):
        if key in names:
            return key
    return None


def split_prefix(names: list[str]) -> str:
    """The prefix every transformer tensor name carries ('' for bare names)."""
    for prefix in TRANSFORMER_PREFIXES:
        if names and sum(n.startswith(prefix) for n in names) >= len(names) // 2 + 1:
            return prefix
    return ""


def is_aux(name: str) -> bool:
    """Tensors that are not parameters: fp8 scales and the scaled-fp8 marker."""
    return name.endswith(SCALE_SUFFIXES) or name.rsplit(".", 1)[-1] == MARKER


def transformer_name_map(names: list[str]) -> dict[str, str]:
    """diffusers parameter name -> name in the file, for a Wan transformer file (prefix handled)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    prefix = split_prefix(names)
    bare = {n[len(prefix):]: n for n in names if n.startswith(prefix) and not is_aux(n)}
    if any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in bare):
        return dict(bare)  # already diffusers names (a diffusers transformer saved as one file)
    # The converter renames keys; given names as values it returns new name -> original name.
    converted = convert_wan_transformer_to_diffusers({k: v for k, v in bare.items()})
    return {new: orig for new, orig in converted.items()}


# ---- VAE ---------------------------------------------------------------------------------------

_RES = (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
        ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))


def _res(sub: str) -> str:
    for new, old in _RES:
        if sub.startswith(new):
            return old + sub[len(new):]
    return sub  # resample.1.*, time_conv.* keep their names


def vae_original_name(key: str, config: dict) -> str:
    """The original Wan VAE name of a diffusers AutoencoderKLWan parameter, for this config's layout."""
    if config.get("attn_scales"):
        raise ValueError("Wan VAEs with attention in the down/up blocks (attn_scales) are not supported")
    nrb = int(config.get("num_res_blocks", 2))
    levels = len(config.get("dim_mult", [1, 2, 4, 4]))
    residual = bool(config.get("is_residual"))
    for new, old in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
        if key.startswith(new):
            return old + key[len(new):]
    side, _, rest = key.partition(".")
    simple = {"conv_in.": "conv1.", "norm_out.gamma": "head.0.gamma", "conv_out.": "head.2.",
              "mid_block.resnets.0.": "middle.0.", "mid_block.attentions.0.": "middle.1.",
              "mid_block.resnets.1.": "middle.2."}
    for new, old in simple.items():
        if rest.startswith(new):
            tail = rest[len(new):]
            return f"{side}.{old}{_res(tail) if 'resnets' in new else tail}"
    m = re.match(r"down_blocks\.(\d+)\.(?:resnets\.(\d+)\.|(downsampler)\.)?(.*)$", rest)
    if side == "encoder" and m:
        i, j, down, sub = m.groups()
        if not residual:
            return f"encoder.downsamples.{i}.{_res(sub)}"
        if down:
            return f"encoder.downsamples.{i}.downsamples.{nrb}.{sub}"
        return f"encoder.downsamples.{i}.downsamples.{j}.{_res(sub)}"
    m = re.match(r"up_blocks\.(\d+)\.(?:resnets\.(\d+)\.|(upsamplers\.0|upsampler)\.)(.*)$", rest)
    if side == "decoder" and m:
        i, j, up, sub = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if residual:
            return f"decoder.upsamples.{i}.upsamples.{nrb + 1 if up else j}.{sub if up else _res(sub)}"
        # 2.1: one flat list: per level nrb+1 residual blocks, then a resample on every level but the last
        start = sum(nrb + 1 + (1 if lv != levels - 1 else 0) for lv in range(i))
        return f"decoder.upsamples.{start + (nrb + 1 if up else int(j))}.{sub if up else _res(sub)}"
    raise ValueError(f"no original Wan VAE name for {key}")


def vae_name_map(diffusers_keys: list[str], config: dict) -> dict[str, str]:
    """diffusers name -> original name for every key of a diffusers AutoencoderKLWan."""
    return {k: vae_original_name(k, config) for k in diffusers_keys}


# ---- text encoder --------------------------------------------------------------------------------

_WAN_T5 = ((r"^token_embedding\.", "shared."), (r"^norm\.", "encoder.final_layer_norm."),
           (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
           (r"^blocks\.(\d+)\.attn\.([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
           (r"^blocks\.(\d+)\.pos_embedding\.embedding\.", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
           (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
           (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
           (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
           (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."))


def t5_name_map(names: list[str]) -> dict[str, str]:
    """transformers UMT5EncoderModel name -> name in the file (ComfyUI/HF T5 layout or original Wan layout)."""
    params = [n for n in names if not is_aux(n) and n != "spiece_model"]
    out: dict[str, str] = {}
    if "token_embedding.weight" in params:
        for n in params:
            new = n
            for pat, rep in _WAN_T5:
                new = re.sub(pat, rep, new)
            out[new] = n
    else:
        out = {n: n for n in params}
    if "shared.weight" in out:
        out.setdefault("encoder.embed_tokens.weight", out["shared.weight"])
    return out
