"""Attention backend: chosen per device from what is installed, overridable, and a kernel that is missing or
fails its test call falls back to native SDPA with a one-line reason instead of crashing the run."""
from __future__ import annotations

import pytest

from engine.speed.attention import DeviceInfo, apply_attention, choose_attention, usable_backends
from engine.speed.options import ATTENTION_BACKENDS, SpeedOptions

ALL = {name: None for name in ATTENTION_BACKENDS}
NATIVE_ONLY = {**{name: f"{name} is not installed" for name in ATTENTION_BACKENDS}, "native": None, "flex": None}
H100 = DeviceInfo("cuda", (9, 0), "NVIDIA H100")
ADA = DeviceInfo("cuda", (8, 9), "RTX 4090")
TURING = DeviceInfo("cuda", (7, 5), "T4")
CPU = DeviceInfo("cpu")


def test_auto_picks_the_fastest_installed_backend_for_the_device():
    assert choose_attention("auto", H100, ALL).backend == "sage"
    assert choose_attention("auto", ADA, {**ALL, "sage": "sage is not installed"}).backend == "flash"
    no_sage = choose_attention("auto", H100, {**ALL, "sage": "sage is not installed"})
    assert no_sage.backend == "flash_3" and "sage" in no_sage.reason
    assert choose_attention("auto", TURING, ALL).backend == "xformers"  # flash and sage need 8.0+
    assert choose_attention("auto", H100, NATIVE_ONLY).backend == "native"
    cpu = choose_attention("auto", CPU, ALL)
    assert cpu.backend == "native" and "CPU" in cpu.reason


def test_an_override_is_honoured_or_falls_back_with_the_reason():
    assert choose_attention("flash", ADA, ALL).backend == "flash"
    missing = choose_attention("sage", ADA, NATIVE_ONLY)
    assert missing.backend == "native" and missing.requested == "sage" and "sage is not installed" in missing.reason
    on_cpu = choose_attention("flash", CPU, ALL)
    assert on_cpu.backend == "native" and "needs a CUDA GPU" in on_cpu.reason
    old_gpu = choose_attention("flash_3", ADA, ALL)
    assert old_gpu.backend == "native" and "9.0" in old_gpu.reason
    assert "\n" not in old_gpu.reason


def test_the_installed_diffusers_reports_native_usable_and_names_missing_kernels():
    usable = usable_backends()
    assert usable["native"] is None
    assert set(usable) == set(ATTENTION_BACKENDS)
    for name, problem in usable.items():
        assert problem is None or (isinstance(problem, str) and problem)


def test_a_kernel_that_fails_its_test_call_falls_back_to_native_on_the_model(demo_model):
    import torch
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(demo_model("wan2.1-t2v-1.3b"), subfolder="transformer")
    # Pretend flex imports fine but its kernel raises on this device (as a wrong-arch build does).
    plan = apply_attention([model], "flex", torch.device("cpu"), usable=ALL,
                           probe=lambda name, device, dtype: "no kernel image is available for execution on the device")
    assert plan.backend == "native" and "flex failed its test call" in plan.reason
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert processors and all(p._attention_backend.value == "native" for p in processors)


def test_native_runs_its_real_test_call_and_the_option_is_validated(demo_model):
    import torch
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(demo_model("wan2.1-t2v-1.3b"), subfolder="transformer")
    plan = apply_attention([model], "auto", torch.device("cpu"))
    assert plan.backend == "native"
    with pytest.raises(ValueError, match="attention 'fast'.*auto, native"):
        SpeedOptions(attention="fast")
