"""Runtime (unmerged) LoRA: forward hooks equal the merged reference, strengths change per step without
recompiles, and detaching leaves the module exactly as it was."""
from __future__ import annotations

import copy

import pytest
import torch

from engine.lora.formats import Patch
from engine.lora.runtime import RuntimeLoraError, RuntimeLoras
from tests.engine.lora.lora_factory import random_lowrank, tiny_transformer


def _inputs(dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g).to(dtype),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 6, 32, generator=g).to(dtype),
        return_dict=False,
    )


def _patches(model, seed=1, rank=4):
    """Low-rank patches on every weight (Linear and the Conv3d), a bias diff and a modulation diff."""
    g = torch.Generator().manual_seed(seed + 100)
    out = []
    for i, (mod, (down, up)) in enumerate(random_lowrank(model, rank=rank, seed=seed).items()):
        out.append(Patch(f"{mod}.weight", "lowrank", (f"k{i}.down", f"k{i}.up"), down=down, up=up,
                         scale=0.5 + 0.25 * (i % 3), alpha=None))
    out.append(Patch("blocks.0.attn1.to_q.bias", "diff", ("qb",), diff=torch.randn(16, generator=g) * 0.1))
    out.append(Patch("blocks.1.scale_shift_table", "diff", ("mod",), diff=torch.randn(1, 6, 16, generator=g) * 0.1))
    return out


def _merged_reference(model, entries, dtype=torch.float64):
    """A copy of `model` in `dtype` with W = W0 + sum_i s_i * ΔW_i merged, computed in fp64 from W0."""
    ref = copy.deepcopy(model).to(dtype)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for patches, s in entries:
            for p in patches:
                w = params[p.target]
                if p.kind == "lowrank":
                    r = p.down.shape[0]
                    d = (p.up.double().reshape(p.up.shape[0], r) * p.scale) @ p.down.double().reshape(r, -1)
                else:
                    d = p.diff.double()
                w.add_((s * d).reshape(w.shape).to(dtype))
    return ref


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_runtime_equals_merged_reference_in_fp64_and_detach_restores_exactly():
    model = tiny_transformer().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _inputs(torch.float64)
    base = model(**x)[0]
    a, b = _patches(model, seed=1), _patches(model, seed=2, rank=2)
    rt = RuntimeLoras(model)
    rt.add("a", a, 0.8)
    rt.add("b", b, -0.4)
    with rt:
        rt.set_step(0, 4)
        got = model(**x)[0]
    ref = _merged_reference(model, [(a, 0.8), (b, -0.4)])(**x)[0]
    assert not torch.allclose(got, base)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert _no_hooks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(**x)[0], base)


def test_schedule_changes_strength_each_step_like_a_remerge_from_w0():
    model = tiny_transformer()
    pristine = copy.deepcopy(model)  # W0: a copy taken while attached would carry the hooks
    x = _inputs()
    x64 = {**x, "hidden_states": x["hidden_states"].double(), "encoder_hidden_states": x["encoder_hidden_states"].double()}
    a = _patches(model, seed=1)
    rt = RuntimeLoras(model)
    rt.add("a", a, [1.0, 0.5, 0.0])
    with rt:
        for step, want in enumerate([1.0, 0.5, 0.0]):
            rt.set_step(step, 3)
            assert rt.strengths() == {"a": want}
            got = model(**x)[0]
            ref = _merged_reference(pristine, [(a, want)])(**x64)[0]
            # fp32 run against an fp64 re-merge of W0 at this step's strength
            torch.testing.assert_close(got.double(), ref, rtol=2e-4, atol=2e-5)
    assert _no_hooks(model)


def test_bf16_input_computes_in_bf16_on_the_inputs_device():
    lin = torch.nn.Linear(8, 6).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    rt = RuntimeLoras(lin)
    rt.add("a", [Patch("weight", "lowrank", ("d", "u"), down=down, up=up, scale=0.5)], 1.5)
    x = torch.randn(3, 8, generator=g).to(torch.bfloat16)
    with rt:
        y = lin(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ (lin.weight.double() + 1.5 * 0.5 * up.double() @ down.double()).T + lin.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=3e-2, atol=3e-2)


def test_compiled_module_does_not_recompile_when_the_strength_changes():
    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    g = torch.Generator().manual_seed(0)
    patches = [Patch("0.weight", "lowrank", ("d", "u"), down=torch.randn(2, 8, generator=g), up=torch.randn(8, 2, generator=g)),
               Patch("2.weight", "diff", ("d2",), diff=torch.randn(4, 8, generator=g))]
    rt = RuntimeLoras(net)
    rt.add("a", patches, [1.0, 0.3, -0.7, 0.0])
    x = torch.randn(2, 8, generator=g)
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    with rt:
        compiled = torch.compile(net, backend=backend)
        outs = []
        for step in range(4):
            rt.set_step(step, 4)
            outs.append(compiled(x))
            eager = net(x)
            torch.testing.assert_close(outs[-1], eager)
    assert len(frames) == 1, f"{len(frames)} graphs compiled; strength changes must not recompile"
    assert not torch.allclose(outs[0], outs[1])
    torch._dynamo.reset()


def test_quantized_linear_layer_gguf():
    gguf = pytest.importorskip("gguf")
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    q = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    layer = GGUFLinear(64, 32, bias=False, compute_dtype=torch.float32)
    layer.weight = GGUFParameter(torch.from_numpy(q), quant_type=gguf.GGMLQuantizationType.Q8_0)
    down, up = torch.randn(4, 64, generator=g), torch.randn(32, 4, generator=g)
    x = torch.randn(5, 64, generator=g)
    base = layer(x)
    rt = RuntimeLoras(layer)
    rt.add("a", [Patch("weight", "lowrank", ("d", "u"), down=down, up=up, scale=0.25)], 0.6)
    with rt:
        got = layer(x)
    w0 = dequantize_gguf_tensor(layer.weight).float()
    ref = x.double() @ (w0.double() + 0.6 * 0.25 * up.double() @ down.double()).T
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(x), base) and _no_hooks(layer)


def test_report_and_refusals():
    model = tiny_transformer()
    rt = RuntimeLoras(model)
    a = _patches(model)
    rt.add("a", a, 1.0)
    rep = rt.report()["a"]
    assert rep["mode"] == "runtime" and rep["rewritten"] == 2  # patch embedding conv + modulation
    assert rep["modules"] == len([p for p in a if p.target.endswith(".weight")]) - 1
    with pytest.raises(RuntimeLoraError, match="already added"):
        rt.add("a", a, 1.0)
    with pytest.raises(RuntimeLoraError, match="no parameter blocks.9"):
        rt.add("b", [Patch("blocks.9.attn1.to_q.weight", "diff", ("x",), diff=torch.zeros(16, 16))], 1.0)
    with pytest.raises(RuntimeLoraError, match="DoRA"):
        rt.add("c", [Patch("blocks.0.attn1.to_q.weight", "dora", ("x",))], 1.0)


def test_detach_after_an_exception_restores_w0():
    model = tiny_transformer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rt = RuntimeLoras(model)
    rt.add("a", _patches(model), [2.0, 1.0])
    with pytest.raises(ZeroDivisionError):
        with rt:
            rt.set_step(1, 2)
            1 / 0
    assert _no_hooks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
