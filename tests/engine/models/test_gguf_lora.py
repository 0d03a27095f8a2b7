"""LoRA on GGUF experts: the runtime path (forward hooks on the quantized layers), reported as mode "runtime",
equal to the exact merge into the same weights dequantized; K-quants load and stay quantized."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _dequantized_copy(module):
    """The same transformer with every GGUF linear layer turned into an nn.Linear of its dequantized weight."""
    import torch
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    for name, sub in list(module.named_modules()):
        if getattr(getattr(sub, "weight", None), "quant_type", None) is None or not hasattr(sub, "in_features"):
            continue
        lin = torch.nn.Linear(sub.in_features, sub.out_features, bias=sub.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(dequantize_gguf_tensor(sub.weight).to(torch.float32))
            if sub.bias is not None:
                lin.bias.copy_(sub.bias.float())
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, lin)
    return module


def _forward(module):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    text = torch.randn(1, 6, 32, generator=g)
    with torch.no_grad():
        return module(x, torch.tensor([700.0]), text, return_dict=False)[0]


def test_runtime_lora_on_gguf_matches_the_merge_on_dequantized_weights(comfy_tree):
    import torch

    from engine.models.catalog import CATALOG
    from engine.lora import LoraManager
    from engine.models.load import load_transformer
    from engine.types import LoraEntry, Stack

    spec = CATALOG["demo-wan2.2-t2v-a14b"]
    path = str(comfy_tree / "unet" / "wan2.2_t2v_high_noise-14B-Q8_0.gguf")
    quant, _, storage = load_transformer(path, spec, torch.float32)
    plain = _dequantized_copy(load_transformer(path, spec, torch.float32)[0])
    assert storage == "gguf-Q8_0"
    assert torch.equal(_forward(quant), _forward(plain))  # same weights: GGUF forward = dequantize + linear

    loras = comfy_tree / "loras" / "demo"
    stack = Stack((LoraEntry(file=str(loras / "anime-a14b-peft.safetensors"), weight=0.7),
                   LoraEntry(file=str(loras / "speed_high_noise.safetensors"), weight=1.0, applies_to="high_noise")))
    before = _forward(quant)
    mgr_q, mgr_p = LoraManager(comfy_tree / "loras"), LoraManager(comfy_tree / "loras")
    rows = mgr_q.apply({"high_noise": quant}, spec, stack, resolve=Path)
    assert [r["mode"] for r in rows] == ["runtime", "runtime"]
    assert rows[0]["coverage"]["applied"] > 0 and not rows[0]["coverage"]["shape_mismatch"]
    merged_rows = mgr_p.apply({"high_noise": plain}, spec, stack, resolve=Path)
    assert [r["mode"] for r in merged_rows] == ["merged", "merged"]
    got, want = _forward(quant), _forward(plain)
    assert not torch.allclose(got, before, atol=1e-3)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), float((got - want).abs().max())
    mgr_q.apply({"high_noise": quant}, spec, Stack(()), resolve=Path)
    assert torch.equal(_forward(quant), before)  # detached: no hooks left


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"])
def test_k_quants_load_through_diffusers_and_stay_quantized(tmp_path, qtype):
    """K-quant blocks hold 256 values, wider than the demo; a 256-wide demo-shaped transformer checks them.
    gguf-py cannot quantize K-quants, so the file holds valid synthetic blocks; the loaded layer must dequantize
    to what gguf's own dequantizer reads from the file (diffusers computes in fp16, hence the tolerance)."""
    import gguf
    import torch
    from diffusers import WanTransformer3DModel

    from engine.models.catalog import CATALOG
    from engine.models.load import load_transformer
    from engine.models.testdata import write_gguf

    torch.manual_seed(0)
    wide = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=32, ffn_dim=256, num_layers=1,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64).eval()
    path = write_gguf(wide, tmp_path / f"wide-{qtype}.gguf", qtype)
    spec = CATALOG["demo-wan2.1-t2v-14b"]
    module, _, storage = load_transformer(str(path), spec, torch.float32)
    w = module.blocks[0].ffn.net[0].proj.weight
    assert storage == f"gguf-{qtype}" and w.quant_type == gguf.GGMLQuantizationType[qtype]
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blocks.0.ffn.0.weight")
    want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    assert torch.isfinite(want).all() and want.abs().max() > 0
    got = dequantize_gguf_tensor(w).float()  # diffusers dequantizes in fp16: a few fp16 roundings apart
    assert torch.allclose(got, want.float(), rtol=5e-3, atol=1e-4 * float(want.abs().max()))
    assert torch.isfinite(module(torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 4, 32),
                                 return_dict=False)[0]).all()
