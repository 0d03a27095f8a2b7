"""What only a CUDA machine can check for the engine core. Skipped without a GPU."""
from __future__ import annotations

import pytest

from engine.facade import Engine, Settings
from engine.types import GenerationRequest

pytestmark = pytest.mark.gpu


def test_cuda_is_picked_with_bf16_transformers_and_an_fp32_vae(demo_model, tmp_path):
    import torch

    model = demo_model("wan2.2-t2v-a14b")
    engine = Engine(Settings(models_dir=model.parent, outputs_dir=tmp_path, loras_dir=tmp_path))
    result = engine.generate(GenerationRequest(model=model.name, prompt="x", steps=2, seed=1, offload="none"))
    pipe = engine._generator._pipe
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.transformer_2.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    assert result.plan["device"] == "cuda" and result.peak_vram_bytes
    engine.release()
    assert torch.cuda.memory_allocated() < 64 << 20
