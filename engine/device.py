"""Pick the compute device and dtype: CUDA when present (bf16), else CPU (fp32)."""
from __future__ import annotations


def pick_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32
