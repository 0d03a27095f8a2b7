"""fp8 weights that stay fp8 in memory: Linear layers whose weight is float8_e4m3fn are upcast per call.

The way ComfyUI runs fp8 checkpoints: the stored weight (and, for ComfyUI's scaled fp8, its per-layer
`scale_weight`) is turned into the input's dtype inside forward, so an fp8 expert costs about half of bf16
and only one layer's upcast copy exists at a time. The module object stays the same (its class is swapped),
so offload hooks, LoRA merges and runtime LoRA hooks see an ordinary Linear.
"""
from __future__ import annotations

import functools

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@functools.cache
def fp8_linear_class():
    import torch
    import torch.nn.functional as F

    class Fp8Linear(torch.nn.Linear):
        """nn.Linear with an fp8 weight; `weight_scale` (0-d fp32) is 1 for plain fp8 files."""

        def forward(self, x):
            w = self.weight.to(x.dtype)
            if self.fp8_scaled:  # a Python flag: reading the 0-d scale would sync the GPU on every call
                w = w * self.weight_scale.to(device=x.device, dtype=x.dtype)
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return F.linear(x, w, bias)

    return Fp8Linear


def make_fp8(linear, scale: float) -> None:
    """Turn an nn.Linear (weight already fp8) into an Fp8Linear in place."""
    import torch

    linear.__class__ = fp8_linear_class()
    linear.register_buffer("weight_scale", torch.tensor(float(scale), dtype=torch.float32), persistent=False)
    linear.fp8_scaled = float(scale) != 1.0


def set_scale(linear, scale: float) -> None:
    """Give an Fp8Linear a new scale (a LoRA merge that outgrew fp8's range, or its removal)."""
    linear.weight_scale.fill_(float(scale))
    linear.fp8_scaled = float(scale) != 1.0


def dequantize(t, scale: float | None, dtype):
    """fp8 (or any) tensor -> `dtype`, times the scale when there is one; the same arithmetic as Fp8Linear
    in fp32, so weights dequantized at load and re-read for a LoRA merge agree bit for bit."""
    import torch

    out = t.to(torch.float32)
    if scale is not None and scale != 1.0:
        out = out * scale
    return out.to(dtype)


def quantize(w32, scale: float):
    """fp32 -> float8_e4m3fn for a stored scale: round to nearest of w/scale, clamped to the finite range."""
    import torch

    return (w32 / scale if scale != 1.0 else w32).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
