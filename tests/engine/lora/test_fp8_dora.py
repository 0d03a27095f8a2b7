"""A DoRA entry on an fp8 weight (scaled fp8 experts): merged in real units from W0 * scale, rounded once
back to fp8 (the scale grows when the result outgrows fp8's range), and removal restores the bytes."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.models.catalog import get_spec
from engine.lora import LoraManager
from engine.models.fp8 import make_fp8, quantize
from engine.types import LoraEntry, Stack
from lora_factory import tiny_transformer

Q = "blocks.0.attn1.to_q"


@pytest.mark.parametrize("grow", [1.2, 40.0])  # magnitude within fp8's range at the stored scale, and outgrowing it
def test_dora_on_fp8_is_within_the_rounding_bound(tmp_path, grow):
    model = tiny_transformer()
    lin = model.get_submodule(Q)
    w = lin.weight.detach().float()
    s0 = float(torch.tensor(float(w.abs().max()) / 200, dtype=torch.float32))  # as the 0-d fp32 buffer holds it
    lin.weight = torch.nn.Parameter(quantize(w, s0), requires_grad=False)
    make_fp8(lin, s0)
    stored0 = lin.weight.detach().view(torch.uint8).clone()
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(2, 16, generator=g) * 0.2, torch.randn(16, 2, generator=g) * 0.2
    w0 = lin.weight.detach().float() * s0
    m = w0.norm(dim=1) * grow
    save_file({f"transformer.{Q}.lora_A.weight": down, f"transformer.{Q}.lora_B.weight": up,
               f"transformer.{Q}.lora_magnitude_vector.weight": m}, str(tmp_path / "d.safetensors"))
    mgr = LoraManager(tmp_path)
    mgr.apply({"single": model}, get_spec("demo-wan2.1-t2v-1.3b"), Stack((LoraEntry("d.safetensors", weight=1.0),)))
    v = w0.double() + up.double() @ down.double()
    ref = m.double().reshape(-1, 1) * v / v.norm(dim=1, keepdim=True)
    s = float(lin.weight_scale)
    assert (s == s0) == (grow < 2), (s, s0)
    got = lin.weight.detach().double() * s
    bound = s * torch.clamp((ref / s).abs() * 2.0 ** -4, min=2.0 ** -10)
    assert bool(((got - ref).abs() <= bound * (1 + 1e-6)).all())
    mgr.apply({"single": model}, get_spec("demo-wan2.1-t2v-1.3b"), Stack())
    assert torch.equal(lin.weight.detach().view(torch.uint8), stored0) and float(lin.weight_scale) == s0
