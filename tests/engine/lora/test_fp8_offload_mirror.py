"""fp8 merges under diffusers group offloading with CUDA streams.

In stream mode the hook keeps pinned CPU copies (`group.cpu_param_dict`) of every parameter and buffer: on
offload it points `param.data` back at them, on onload it copies every parameter AND buffer from them (a
group's buffers are not put back on offload, so a write to a buffer on the GPU is lost at the next onload;
diffusers/hooks/group_offloading.py `_offload_to_memory` / `_process_tensors_from_modules`). A LoRA merge
that recomputes an fp8 weight's `weight_scale` must write the new scale into that copy too, or the merged
weight would be used with the old scale from the next step on: silently wrong, never an error.

On CPU the stream path cannot run (pinned memory needs an accelerator), so the first test emulates its
onload/offload with the same `cpu_param_dict` contract; the gpu-marked test runs the real thing."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from engine.models.catalog import get_spec
from engine.lora import LoraManager
from engine.models.fp8 import make_fp8, quantize
from engine.types import LoraEntry, Stack
from lora_factory import tiny_transformer

Q = "blocks.0.attn1.to_q"
T2V = "demo-wan2.1-t2v-1.3b"


def _fp8_model(seed_scale: float = 200.0):
    """A tiny transformer whose to_q is scaled fp8 (its weights use 1/200 of fp8's range: a big LoRA outgrows it)."""
    model = tiny_transformer()
    lin = model.get_submodule(Q)
    w = lin.weight.detach().float()
    s0 = float(torch.tensor(float(w.abs().max()) / seed_scale, dtype=torch.float32))
    lin.weight = torch.nn.Parameter(quantize(w, s0), requires_grad=False)
    make_fp8(lin, s0)
    return model, lin, s0


def _big_lora(folder, factor: float = 30.0):
    g = torch.Generator().manual_seed(5)
    save_file({f"transformer.{Q}.lora_A.weight": torch.randn(2, 16, generator=g) * factor,
               f"transformer.{Q}.lora_B.weight": torch.randn(16, 2, generator=g)}, str(folder / "big.safetensors"))


def _state(model):
    out = {k: v.detach().cpu().reshape(-1).view(torch.uint8).clone() for k, v in model.named_parameters()}
    out.update({f"{n}.scale": float(m.weight_scale) for n, m in model.named_modules() if hasattr(m, "weight_scale")})
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]) if isinstance(a[k], float) else torch.equal(a[k], b[k]), k


def test_rescaled_fp8_merge_survives_stream_mode_onload(tmp_path):
    _big_lora(tmp_path)
    model, lin, s0 = _fp8_model()
    pinned = {t: t.data.clone() for t in [*model.parameters(), *model.buffers()]}  # what the hook keeps
    group = SimpleNamespace(cpu_param_dict=pinned, offload_to_disk_path=None)
    model._diffusers_hook = SimpleNamespace(hooks={"group": SimpleNamespace(group=group)})

    def onload_offload():
        for t, copy in pinned.items():
            t.data = copy.clone()  # onload copies from the pinned tensors; the device copy is a new tensor

    w0 = _state(model)
    mgr = LoraManager(tmp_path)
    mgr.apply({"single": model}, get_spec(T2V), Stack((LoraEntry("big.safetensors", weight=1.0),)))
    merged = _state(model)
    assert merged[f"{Q}.scale"] > s0  # the merge outgrew fp8's range at the file's scale
    onload_offload()
    _same(_state(model), merged)
    mgr.apply({"single": model}, get_spec(T2V), Stack())
    onload_offload()
    _same(_state(model), w0)


@pytest.mark.gpu
def test_rescaled_fp8_merge_under_real_cuda_streams(tmp_path):
    from diffusers.hooks import apply_group_offloading

    _big_lora(tmp_path)
    model, lin, s0 = _fp8_model()
    ref, _, _ = _fp8_model()
    ref = ref.cuda()
    stack = Stack((LoraEntry("big.safetensors", weight=1.0),))
    LoraManager(tmp_path).apply({"single": ref}, get_spec(T2V), stack)
    apply_group_offloading(model, onload_device=torch.device("cuda"), offload_type="block_level",
                           num_blocks_per_group=1, use_stream=True)
    args = (torch.randn(1, 16, 1, 4, 4, device="cuda"), torch.tensor([500], device="cuda"),
            torch.randn(1, 8, 32, device="cuda"))
    with torch.no_grad():
        model(*args, return_dict=False)  # buffers now live on the GPU between onloads
    mgr = LoraManager(tmp_path)
    mgr.apply({"single": model}, get_spec(T2V), stack)
    assert float(lin.weight_scale) > s0
    with torch.no_grad():
        for _ in range(2):  # twice: the second forward onloads from the pinned copies again
            assert torch.equal(model(*args, return_dict=False)[0], ref(*args, return_dict=False)[0])
