"""Weight schedules: parsing, the per-step expansion, and a scheduled run equal to a reference loop that
re-merges the entry from W0 at each step's weight."""
from __future__ import annotations

import pytest
import torch

from engine.models.catalog import get_spec
from engine.cli.core import parse_lora_spec
from engine.lora import LoraManager
from engine.lora.schedule import expand, parse_weight, strength_for_expert
from engine.types import LoraEntry, RequestError, Stack
from lora_factory import random_lowrank, snapshot, tiny_transformer, write_lora

A14B = "demo-wan2.2-t2v-a14b"


def test_values_spread_evenly_over_the_steps_like_wan2gp():
    assert expand([1.0, 0.8, 0.5], 6) == [1.0, 1.0, 0.8, 0.8, 0.5, 0.5]
    assert expand([1.0, 0.5], 5) == [1.0, 1.0, 1.0, 0.5, 0.5]  # step i takes value[floor(i * 2 / 5)]
    assert expand([1.0, 0.8, 0.5], 2) == [1.0, 0.8]
    assert expand([0.3], 4) == [0.3] * 4


def test_phase_schedules_cover_their_experts_phase():
    high = strength_for_expert((1.0, 0.5), False, "high_noise", 4)
    low = strength_for_expert((0.2, 0.4, 0.6), False, "low_noise", 4)
    assert [high(i, 10) for i in range(4)] == [1.0, 1.0, 0.5, 0.5]
    assert [low(i, 10) for i in range(4, 10)] == [0.2, 0.2, 0.4, 0.4, 0.6, 0.6]
    whole = strength_for_expert((1.0, 0.0), True, "low_noise", 4)
    assert [whole(i, 10) for i in range(10)] == [1.0] * 5 + [0.0] * 5


def test_entry_and_cli_spec_forms():
    e = parse_lora_spec("loras/speed.safetensors=1.0:0.8:0.5,both")
    assert e.weight == (1.0, 0.8, 0.5) and e.scheduled and e.to_dict()["weight"] == [1.0, 0.8, 0.5]
    assert parse_lora_spec("x.safetensors=0.7").weight == 0.7
    assert LoraEntry.from_dict({"file": "x", "weight": [0.4]}).weight == 0.4  # a one-value list is a constant
    assert not LoraEntry("x", (0.5, 0.5)).scheduled
    with pytest.raises(RequestError, match="1:x"):
        parse_lora_spec("x.safetensors=1:x")
    with pytest.raises(RequestError, match=r"weight 11.0 \(in \[1.0, 11.0\]\)"):
        LoraEntry("x", [1.0, 11.0])
    with pytest.raises(RequestError, match="empty schedule"):
        LoraEntry("x", [])
    assert parse_weight("2") == 2.0
    fp = Stack((LoraEntry("x", (1.0, 0.5)),)).fingerprint()
    assert fp != Stack((LoraEntry("x", (1.0, 0.6)),)).fingerprint() != Stack((LoraEntry("x", 1.0),)).fingerprint()


@pytest.fixture
def lora_dir(tmp_path):
    model = tiny_transformer(width=32)
    lowrank = {k: (d, u * 5) for k, (d, u) in random_lowrank(model, rank=4, seed=21).items()}
    write_lora(tmp_path / "a.safetensors", "wan", lowrank, alpha=2.0)
    write_lora(tmp_path / "b.safetensors", "peft", random_lowrank(model, rank=2, seed=22))
    return tmp_path


def _x(seed=4):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([700]),
                encoder_hidden_states=torch.randn(1, 6, 32, generator=g), return_dict=False)


def test_scheduled_stack_equals_remerge_from_w0_at_each_steps_weight(lora_dir):
    """Per step and expert: runtime hooks (scheduled a, constant b merged) vs a fresh merge at that step's weights."""
    spec = get_spec(A14B)
    high, low = tiny_transformer(width=32, seed=1), tiny_transformer(width=32, seed=2)
    w0 = {"high_noise": snapshot(high), "low_noise": snapshot(low)}
    experts = {"high_noise": high, "low_noise": low}
    stack = Stack((LoraEntry("a.safetensors", weight=(1.0, 0.25), low_noise_weight=(0.5, -0.5, 1.5)),
                   LoraEntry("b.safetensors", weight=0.7)))
    mgr = LoraManager(lora_dir)
    steps, high_steps = 7, 3
    rows = mgr.apply(experts, spec, stack, steps=steps, high_steps=high_steps)
    assert rows[0]["mode"] == "runtime" and rows[1]["mode"] == "merged"
    assert rows[0]["weights"] == {"high_noise": [1.0, 0.25], "low_noise": [0.5, -0.5, 1.5]}
    rt = mgr.last_stats["runtime"]
    assert rt["high_noise"]["entries"] == 1 and rt["low_noise"]["extra_linear_flops_fraction"] > 0
    ref_mgr = LoraManager(lora_dir)
    ref_high, ref_low = tiny_transformer(width=32, seed=1), tiny_transformer(width=32, seed=2)
    ref = {"high_noise": ref_high, "low_noise": ref_low}
    want_high = [1.0, 1.0, 0.25]  # 2 values over the 3 high-noise steps
    want_low = [0.5, 0.5, -0.5, 1.5]  # 3 values over the 4 low-noise steps
    x = _x()
    for step in range(steps):
        mgr.set_step(step, steps)
        expert = "high_noise" if step < high_steps else "low_noise"
        w = want_high[step] if step < high_steps else want_low[step - high_steps]
        got = experts[expert](**x)[0]
        ref_stack = Stack((LoraEntry("a.safetensors", weight=w, applies_to=expert), LoraEntry("b.safetensors", weight=0.7)))
        ref_mgr.apply(ref, spec, ref_stack)
        want = ref[expert](**x)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    mgr.remove(experts)
    assert all(torch.equal(v, w0["high_noise"][k]) for k, v in high.state_dict().items())
    assert all(torch.equal(v, w0["low_noise"][k]) for k, v in low.state_dict().items())
    assert all(not m._forward_hooks for m in [*high.modules(), *low.modules()])


def test_constant_schedule_is_merged_and_equals_the_number(lora_dir):
    spec = get_spec(A14B)
    a, b = tiny_transformer(width=32), tiny_transformer(width=32)
    LoraManager(lora_dir).apply({"high_noise": a}, spec, Stack((LoraEntry("a.safetensors", weight=(0.6, 0.6)),)),
                                steps=4, high_steps=2)
    rows = LoraManager(lora_dir).apply({"high_noise": b}, spec, Stack((LoraEntry("a.safetensors", weight=0.6),)))
    assert rows[0]["mode"] == "merged"
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert all(not m._forward_hooks for m in a.modules())


def test_restacking_detaches_the_runtime_hooks_first(lora_dir):
    spec = get_spec(A14B)
    model = tiny_transformer(width=32)
    w0 = snapshot(model)
    mgr = LoraManager(lora_dir)
    mgr.apply({"high_noise": model}, spec, Stack((LoraEntry("a.safetensors", weight=(1.0, 0.0)),)), steps=2, high_steps=2)
    assert any(m._forward_hooks for m in model.modules())
    mgr.apply({"high_noise": model}, spec, Stack((LoraEntry("b.safetensors", weight=0.5),)))
    assert not any(m._forward_hooks for m in model.modules())
    mgr.apply({"high_noise": model}, spec, Stack())
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


def test_lora_merge_refuses_a_schedule(lora_dir):
    from engine.lora.merge import model_param_shapes  # noqa: F401  (plan() takes shapes)

    spec = get_spec(A14B)
    shapes = {"high_noise": {k: tuple(v.shape) for k, v in tiny_transformer(width=32).state_dict().items()}}
    with pytest.raises(RequestError, match="weight schedule"):
        LoraManager(lora_dir).plan(spec, Stack((LoraEntry("a.safetensors", weight=(1.0, 0.5)),)), shapes)


@pytest.mark.slow
def test_pipeline_run_with_a_schedule_equals_a_per_step_remerge_loop(demo_model, lora_dir, tmp_path):
    """The demo Wan2.2 pipeline: scheduled entry via hooks + set_step vs the entry merged from W0 at each step."""
    from engine.models.detect import detect
    from engine.facade import Settings
    from engine.run.generate import Generator
    from engine.lora.schedule import value_at
    from engine.lora.stack_runtime import high_noise_steps_of

    model = demo_model("wan2.2-t2v-a14b")
    info = detect(model)
    spec = get_spec(info.type)
    gen = Generator(Settings(outputs_dir=tmp_path), LoraManager(lora_dir))
    pipe = gen.load(info, spec)
    experts = gen.experts(pipe, spec)
    steps = 6
    high_steps = high_noise_steps_of(pipe, spec.boundary_ratio, steps)
    assert 0 < high_steps < steps
    sched_hi, sched_lo = (1.0, 0.2), (0.6, -0.4, 1.2)
    entry = LoraEntry("a.safetensors", weight=sched_hi, low_noise_weight=sched_lo)

    def run(before_step):
        before_step(0)

        def cb(p, i, t, kw):
            before_step(i + 1)
            return {}

        return pipe(prompt="a boat", height=32, width=32, num_frames=5, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(3), output_type="latent",
                    callback_on_step_end=cb).frames

    mgr = gen.library
    rows = mgr.apply(experts, spec, Stack((entry,)), steps=steps, high_steps=high_steps)
    assert rows[0]["mode"] == "runtime"
    scheduled = run(lambda i: mgr.set_step(i, steps) if i < steps else None)
    mgr.remove(experts)

    def remerge(i):
        if i >= steps:
            return
        if i < high_steps:
            w, where = value_at(sched_hi, i, high_steps), "high_noise"
        else:
            w, where = value_at(sched_lo, i - high_steps, steps - high_steps), "low_noise"
        mgr.apply(experts, spec, Stack((LoraEntry("a.safetensors", weight=w, applies_to=where),)))

    reference = run(remerge)
    mgr.remove(experts)
    plain = run(lambda i: None)
    assert not torch.allclose(scheduled, plain, atol=1e-3)
    torch.testing.assert_close(scheduled, reference, rtol=1e-4, atol=1e-4)


def test_runtime_rows_carry_their_per_step_cost(lora_dir):
    spec = get_spec(A14B)
    model = tiny_transformer(width=32)
    rows = LoraManager(lora_dir).apply({"high_noise": model}, spec,
                                       Stack((LoraEntry("a.safetensors", weight=(1.0, 0.5)),
                                              LoraEntry("b.safetensors", weight=0.5))), steps=4, high_steps=2)
    rt = rows[0]["runtime"]["high_noise"]
    assert rt["modules"] > 0 and 0 < rt["extra_linear_flops_fraction"] < 1
    assert "unmerged" in rows[0]["mode_note"] and "runtime" not in rows[1]
