"""The one dtype table: our short names, safetensors header codes, torch dtype names and bytes per element.

Torch-free: torch dtypes are looked up by name when asked for (`torch_dtype`).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.types import RequestError


@dataclass(frozen=True)
class DType:
    name: str  # our name: bf16, fp16, fp32, fp8_e4m3fn, ...
    st_code: str  # safetensors header code: BF16, F16, F32, F8_E4M3, ...
    torch_name: str  # attribute of the torch module
    bytes: int


DTYPES: tuple[DType, ...] = (
    DType("fp64", "F64", "float64", 8),
    DType("fp32", "F32", "float32", 4),
    DType("fp16", "F16", "float16", 2),
    DType("bf16", "BF16", "bfloat16", 2),
    DType("fp8_e4m3fn", "F8_E4M3", "float8_e4m3fn", 1),
    DType("fp8_e5m2", "F8_E5M2", "float8_e5m2", 1),
    DType("int64", "I64", "int64", 8),
    DType("int32", "I32", "int32", 4),
    DType("int16", "I16", "int16", 2),
    DType("int8", "I8", "int8", 1),
    DType("uint8", "U8", "uint8", 1),
    DType("bool", "BOOL", "bool", 1),
)
BY_NAME = {d.name: d for d in DTYPES}
BY_ST_CODE = {d.st_code: d for d in DTYPES}
BY_TORCH_NAME = {d.torch_name: d for d in DTYPES}
# What a user may ask weights to be cast to (`lora merge --dtype`, the Tools tab, `plan --dtype`).
CAST_CHOICES = ("bf16", "fp16", "fp32")
# Bytes per weight for the memory estimator: the cast choices plus fp8 storage.
WEIGHT_BYTES = {**{n: BY_NAME[n].bytes for n in CAST_CHOICES}, "fp8": 1}


def lookup(name: str) -> DType:
    """`bf16`, `bfloat16` or `BF16` -> its table row; RequestError naming the choices otherwise."""
    row = BY_NAME.get(name) or BY_ST_CODE.get(name) or BY_TORCH_NAME.get(str(name).removeprefix("torch."))
    if row is None:
        raise RequestError(f"dtype {name!r} is not one of {', '.join(CAST_CHOICES)}")
    return row


def torch_dtype(name: str):
    """`bf16` / `bfloat16` / `BF16` -> torch.bfloat16 (None when this torch build lacks it)."""
    import torch

    value = getattr(torch, lookup(name).torch_name, None)
    return value if isinstance(value, torch.dtype) else None
