"""The memory estimate knows each storage's bytes per parameter; on a GPU, fp8 stays fp8 in VRAM."""
from __future__ import annotations

import pytest


def test_estimate_prices_each_storage():
    from engine.models.catalog import CATALOG
    from engine.memory.estimate import Workload

    spec = CATALOG["wan2.2-t2v-a14b"]
    w = {s: Workload(spec, 720, 1280, 81, storage=s).weights()["transformer"] for s in
         (None, "bf16", "fp8_scaled", "fp8_e4m3fn", "gguf-Q8_0", "gguf-Q4_K", "gguf-Q4_0")}
    p = spec.memory.transformer_params
    assert w[None] == w["bf16"] == 2 * p
    assert w["fp8_scaled"] == w["fp8_e4m3fn"] == p
    assert w["gguf-Q8_0"] == int(p * 34 / 32) and w["gguf-Q4_K"] == int(p * 144 / 256) and w["gguf-Q4_0"] == int(p * 18 / 32)
    # fp8/GGUF layers are upcast one at a time: the denoise phase carries the largest layer's bf16 copy
    bf16, fp8 = Workload(spec, 480, 832, 81), Workload(spec, 480, 832, 81, storage="fp8_scaled")
    assert fp8.activation_bytes() - bf16.activation_bytes() == spec.memory.ffn * spec.memory.width * 2


def test_plan_ram_reason_for_offloaded_copies():
    from engine.models.catalog import CATALOG
    from engine.memory import plan_for
    from engine.memory.snapshot import MemorySnapshot
    from engine.memory.units import GIB

    spec = CATALOG["wan2.2-t2v-a14b"]
    snap = MemorySnapshot.planned(16 * GIB, 32 * GIB)
    bf16 = plan_for(spec, 720, 1280, 81, snapshot=snap)
    q4 = plan_for(spec, 720, 1280, 81, snapshot=snap, storage="gguf-Q4_K")
    assert any("of system RAM" in r for r in bf16.reasons)  # two bf16 experts offloaded: more than 32 GiB
    assert not any("of system RAM" in r for r in q4.reasons)
    assert q4.estimate_bytes["ram"] < bf16.estimate_bytes["ram"]


@pytest.mark.gpu
def test_fp8_stays_fp8_in_vram_and_matches_the_estimate(comfy_tree):
    import torch

    from engine.models.catalog import CATALOG
    from engine.memory.estimate import STORAGE_BYTES_PER_PARAM
    from engine.models.load import load_transformer

    path = comfy_tree / "diffusion_models" / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
    module, _, storage = load_transformer(str(path), CATALOG["demo-wan2.2-t2v-a14b"], torch.bfloat16)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    module.to("cuda")
    linear = [m for m in module.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float8_e4m3fn]
    assert linear and all(m.weight.device.type == "cuda" for m in linear)
    fp8_params = sum(m.weight.numel() for m in linear)
    fp8_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linear)
    assert fp8_bytes == fp8_params * STORAGE_BYTES_PER_PARAM[storage]
    other = sum(p.numel() * p.element_size() for p in module.parameters()) - fp8_bytes
    assert torch.cuda.memory_allocated() - before <= (fp8_bytes + other) * 1.1 + (2 << 20)
    x = torch.randn(1, 16, 3, 8, 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = module(x, torch.tensor([500.0], device="cuda"), torch.randn(1, 4, 32, device="cuda", dtype=torch.bfloat16),
                     return_dict=False)[0]
    assert torch.isfinite(out).all() and all(m.weight.dtype == torch.float8_e4m3fn for m in linear)
