"""Tiny, seeded, random-weight Wan models in diffusers layout, one per architecture.

They exist so the whole product (loading, LoRA stacks, offload, generation, video out) runs on a
machine without real weights. They load through exactly the same code as a real
`Wan-AI/Wan2.*-Diffusers` folder. A `wanstack_demo.json` marker labels them as random weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from engine.models.catalog import DEMO_WIDTH, REAL, get_spec
from engine.fileio import atomic_path
from engine.types import RequestError

DEMO_MARKER = "wanstack_demo.json"
TEXT_DIM = 32
_ARCHS = {s.type: s for s in REAL}


def build_tokenizer():
    """A byte-level tokenizer built locally: every UTF-8 byte is one token (no hub, no training)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def _text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new", is_encoder_decoder=False,
    )
    return UMT5EncoderModel(cfg).eval()


def _vae(ti2v: bool):
    from diffusers import AutoencoderKLWan

    common = dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    if ti2v:  # Wan2.2 VAE: 48 latent channels, 2x2 patchify in front of 8x conv downsampling -> 16x spatial
        return AutoencoderKLWan(
            z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
            scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48, **common,
        ).eval()
    return AutoencoderKLWan(z_dim=16, **common).eval()


def _transformer(arch_type: str, width: int, image_dim: int | None):
    from diffusers import WanTransformer3DModel

    spec = _ARCHS[arch_type]
    in_ch = {"t2v": 16, "i2v": 36, "ti2v": 48}[spec.task]
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=width // 2,
        in_channels=in_ch, out_channels=48 if spec.task == "ti2v" else 16, text_dim=TEXT_DIM, freq_dim=32,
        ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        image_dim=image_dim, added_kv_proj_dim=width if image_dim else None, rope_max_seq_len=64,
    ).eval()


def _image_encoder():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=32,
    )
    processor = CLIPImageProcessor(
        crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32}, do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return CLIPVisionModel(cfg).eval(), processor


def build_demo_pipeline(arch: str, seed: int = 0):
    """The demo pipeline for `arch` (a real model type such as 'wan2.2-t2v-a14b'), in memory."""
    import torch
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    if arch.startswith("demo-"):
        arch = arch[len("demo-"):]
    if arch not in _ARCHS:
        raise RequestError(f"--arch {arch!r} is not a model type; choose one of {', '.join(_ARCHS)}")
    spec = _ARCHS[arch]
    width = DEMO_WIDTH[spec.memory.width]
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = _text_encoder(len(tokenizer))
    vae = _vae(spec.task == "ti2v")
    image_encoder = image_processor = None
    if spec.memory.image_encoder_params:
        image_encoder, image_processor = _image_encoder()
    transformer = _transformer(arch, width, 32 if image_encoder is not None else None)
    transformer_2 = _transformer(arch, width, None) if spec.dual_expert else None
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=spec.shift
    )
    parts = dict(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
        transformer=transformer, transformer_2=transformer_2, boundary_ratio=spec.boundary_ratio,
        expand_timesteps=spec.task == "ti2v",
    )
    if spec.pipeline_class == "WanImageToVideoPipeline":
        return WanImageToVideoPipeline(image_encoder=image_encoder, image_processor=image_processor, **parts)
    return WanPipeline(**parts)


def build_demo_model(out_dir: str | os.PathLike, arch: str = "wan2.1-t2v-1.3b", seed: int = 0,
                     loras_dir: str | os.PathLike | None = None) -> Path:
    """Write a demo model folder (temp folder first, so a failure leaves nothing behind), and with
    `loras_dir` the demo LoRAs made for this architecture."""
    out = Path(out_dir)
    if arch.startswith("demo-"):
        arch = arch[len("demo-"):]
    get_spec(arch)
    if out.exists() and any(out.iterdir()):
        raise RequestError(f"--out {out} exists and is not empty; choose a new folder or delete it")
    pipe = build_demo_pipeline(arch, seed)
    with atomic_path(out, directory=True) as tmp:
        # Sharded like the real 14B checkpoints, so every reader is exercised on index + shards.
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size="64KB")
        os.chmod(tmp, 0o755)
        marker = {
            "arch": arch, "type": f"demo-{arch}", "seed": seed,
            "note": "Random weights for trying the workflow. Real videos need a Wan checkpoint in models/.",
        }
        (tmp / DEMO_MARKER).write_text(json.dumps(marker, indent=2))
        if out.exists():
            out.rmdir()  # empty (checked above): the rename puts the finished folder in its place
    if loras_dir is not None:
        from engine.models.demo_loras import write_demo_loras

        write_demo_loras(loras_dir, {arch: pipe.transformer}, seed)
    return out
