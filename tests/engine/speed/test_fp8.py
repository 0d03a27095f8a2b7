"""fp8 compute: behind a capability check; on an Ada/Hopper GPU the fp8 matmul stays close to the upcast one."""
from __future__ import annotations

import pytest

from engine.speed.attention import DeviceInfo
from engine.speed.fp8 import disable_fp8_compute, enable_fp8_compute, fp8_compute_problem, fp8_layers


def _fp8_model(device="cpu"):
    import torch

    from engine.models.fp8 import make_fp8, quantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    for lin in (model[0], model[2]):
        scale = float(lin.weight.abs().max() / 448)
        lin.weight = torch.nn.Parameter(quantize(lin.weight.detach(), scale), requires_grad=False)
        make_fp8(lin, scale)
    return model.to(device)


def test_capability_check():
    assert "CUDA" in fp8_compute_problem(DeviceInfo("cpu"))
    assert "8.9+" in fp8_compute_problem(DeviceInfo("cuda", (8, 6), "RTX 3090"))
    assert fp8_compute_problem(DeviceInfo("cuda", (8, 9), "RTX 4090")) is None
    assert fp8_compute_problem(DeviceInfo("cuda", (9, 0), "H100")) is None


def test_swap_is_reversible_and_cpu_calls_take_the_upcast_path():
    import torch

    model = _fp8_model()
    x = torch.randn(3, 5, 64)
    before = model(x)
    assert fp8_layers([model]) == 2 and enable_fp8_compute([model]) == 2
    assert torch.equal(model(x), before)  # a CPU input falls back to Fp8Linear's own forward
    assert disable_fp8_compute([model]) == 2 and fp8_layers([model]) == 2
    assert type(model[0]).__name__ == "Fp8Linear"


@pytest.mark.gpu
def test_fp8_matmul_on_ada_or_hopper_is_close_to_the_upcast_result():
    import torch

    if fp8_compute_problem(DeviceInfo.capture("cuda")):
        pytest.skip(fp8_compute_problem(DeviceInfo.capture("cuda")))
    model = _fp8_model("cuda")
    x = torch.randn(4, 256, 64, device="cuda", dtype=torch.bfloat16)
    ref = model(x)
    enable_fp8_compute([model])
    out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 0.08, rel
