"""fp8 compute for fp8-stored experts (engine/models/fp8.py's Fp8Linear) with torch._scaled_mm on Ada/Hopper.

Fp8Linear upcasts its fp8 weight to the input dtype on every call. With fp8 compute the input is quantized
per tensor to float8_e4m3fn (scale = amax / 448) and multiplied against the stored fp8 weight by the tensor
cores (`torch._scaled_mm`, fp8 x fp8 -> bf16), about twice the matmul rate of bf16 on sm89/sm90. The
activation quantization costs precision, so it is opt-in (--fp8-compute). The module object stays the same
(its class is swapped, as Fp8Linear does), so offload hooks, LoRA merges into the fp8 weight and runtime-LoRA
hooks keep working; any call it cannot take (CPU input, fp32, odd sizes) runs Fp8Linear's own forward.
"""
from __future__ import annotations

import functools

FP8_MAX = 448.0
MIN_CAPABILITY = (8, 9)  # Ada (sm89) and Hopper (sm90) have fp8 tensor cores


def fp8_compute_problem(device) -> str | None:
    """Why fp8 compute cannot run on `device` (an engine.speed.attention.DeviceInfo); None when it can."""
    if device.type != "cuda":
        return "fp8 compute needs a CUDA GPU"
    if device.capability is not None and tuple(device.capability) < MIN_CAPABILITY:
        cap = ".".join(map(str, device.capability))
        return f"fp8 compute needs compute capability 8.9+ (Ada, Hopper), this GPU has {cap}"
    import torch

    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no torch._scaled_mm"
    return None


@functools.cache
def _scaled_class(base):
    import torch

    class Fp8ScaledMMLinear(base):
        """Fp8Linear whose matmul runs in fp8 on the tensor cores when it can."""

        def forward(self, x):
            w = self.weight
            if (x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16)
                    or w.dtype != torch.float8_e4m3fn or self.in_features % 16 or self.out_features % 16):
                return super().forward(x)
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            x_scale = (x2.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
            x8 = (x2 / x_scale.to(x2.dtype)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            w_scale = self.weight_scale.to(device=x.device, dtype=torch.float32)
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            y = torch._scaled_mm(x8, w.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=x.dtype)
            return y.reshape(*shape[:-1], self.out_features)

    Fp8ScaledMMLinear.__name__ = "Fp8ScaledMMLinear"
    return Fp8ScaledMMLinear


def enable_fp8_compute(transformers) -> int:
    """Swap every Fp8Linear of the experts to the scaled-mm class; returns how many layers."""
    from engine.models.fp8 import fp8_linear_class

    base = fp8_linear_class()
    return _swap_class(transformers, base, _scaled_class(base))


def disable_fp8_compute(transformers) -> int:
    """Back to Fp8Linear's upcast forward; returns how many layers."""
    from engine.models.fp8 import fp8_linear_class

    base = fp8_linear_class()
    return _swap_class(transformers, _scaled_class(base), base)


def _swap_class(transformers, old, new) -> int:
    n = 0
    for module in transformers:
        for sub in module.modules():
            if type(sub) is old:
                sub.__class__ = new
                n += 1
    return n


def fp8_layers(transformers) -> int:
    from engine.models.fp8 import fp8_linear_class

    base = fp8_linear_class()
    return sum(isinstance(sub, base) for m in transformers for sub in m.modules())
