"""apply_plan / undo_plan on a tiny demo pipeline with diffusers' real hooks, on the CPU.

Every mode must give exactly the output of `none`, honour a LoRA-style in-place weight edit made
after the hooks are in place, and leave no hook behind when undone.
"""
from __future__ import annotations

import pytest
import torch

from engine.memory import OffloadPlan
from engine.memory.offload import active_hooks, applied_mode, apply_plan, undo_plan

CPU = torch.device("cpu")
PLANS = [
    OffloadPlan(mode="model"),
    OffloadPlan(mode="model", text_encoder_on_cpu=True),
    OffloadPlan(mode="group"),
    OffloadPlan(mode="group", text_encoder_on_cpu=True, vae_tiling=True),
    OffloadPlan(mode="sequential"),
    OffloadPlan(mode="none", text_encoder_on_cpu=True),
]
IDS = [f"{p.mode.value}{'-te_cpu' if p.text_encoder_on_cpu else ''}{'-tiling' if p.vae_tiling else ''}" for p in PLANS]


@pytest.fixture(scope="module")
def pipes():
    from engine.models.demo import build_demo_pipeline

    built = {}

    def get(arch):
        if arch not in built:
            pipe = build_demo_pipeline(arch, seed=0)
            pipe.set_progress_bar_config(disable=True)
            built[arch] = pipe
        return built[arch]

    return get


def generate(pipe, steps=2):
    return pipe("a red cat", negative_prompt="blurry", height=32, width=32, num_frames=5, num_inference_steps=steps,
                guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt",
                max_sequence_length=16).frames


def lora_like_edit(pipe):
    """What the LoRA engine does: write W0 + delta into param.data in place. Returns an undo."""
    targets = [pipe.transformer.blocks[0].ffn.net[0].proj.weight, pipe.transformer.blocks[1].attn1.to_q.weight]
    originals = [p.data.clone() for p in targets]
    for p in targets:
        p.data.add_(torch.full_like(p.data, 0.05))

    def restore():
        for p, w0 in zip(targets, originals):
            p.data.copy_(w0)

    return restore


@pytest.fixture(scope="module")
def reference(pipes):
    """Outputs with no offload: plain and with the LoRA-like edit."""
    pipe = pipes("wan2.1-t2v-1.3b")
    apply_plan(pipe, OffloadPlan(mode="none"), CPU)
    plain = generate(pipe)
    restore = lora_like_edit(pipe)
    edited = generate(pipe)
    restore()
    assert not torch.equal(plain, edited)  # the edit is visible, so equality below means something
    assert torch.equal(generate(pipe), plain)
    return plain, edited


@pytest.mark.slow
@pytest.mark.parametrize("plan", PLANS, ids=IDS)
def test_each_mode_matches_none_with_and_without_a_lora_edit(pipes, reference, plan):
    plain, edited = reference
    pipe = pipes("wan2.1-t2v-1.3b")
    apply_plan(pipe, plan, CPU)
    try:
        assert applied_mode(pipe)["mode"] == plan.mode.value
        if plan.mode.value != "none":
            assert active_hooks(pipe), "the mode installed no hooks"
        if plan.text_encoder_on_cpu:
            assert not hasattr(pipe.text_encoder, "_hf_hook") and not getattr(pipe.text_encoder, "_diffusers_hook", None)
        assert pipe.vae.use_tiling is plan.vae_tiling
        assert torch.equal(generate(pipe), plain)
        restore = lora_like_edit(pipe)  # after the hooks are in place, as the generator does it
        assert torch.equal(generate(pipe), edited)
        restore()
        assert torch.equal(generate(pipe), plain)
    finally:
        undo_plan(pipe)
    assert active_hooks(pipe) == []
    assert pipe.vae.use_tiling is False
    # and the other order: a stack applied before the hooks survives them
    restore = lora_like_edit(pipe)
    apply_plan(pipe, plan, CPU)
    try:
        assert torch.equal(generate(pipe), edited)
    finally:
        undo_plan(pipe)
        restore()


@pytest.mark.slow
def test_switching_modes_back_and_forth_leaves_no_stale_hooks(pipes, reference):
    plain, _ = reference
    pipe = pipes("wan2.1-t2v-1.3b")
    for mode in ["group", "model", "sequential", "none", "model", "group", "none"]:
        apply_plan(pipe, OffloadPlan(mode=mode), CPU)  # apply_plan undoes the previous mode itself
        hooks = active_hooks(pipe)
        assert (hooks == []) == (mode == "none"), (mode, hooks[:3])
        assert torch.equal(generate(pipe), plain), mode
    undo_plan(pipe)
    undo_plan(pipe)  # idempotent
    assert active_hooks(pipe) == [] and applied_mode(pipe) is None
    assert all(p.device.type == "cpu" for p in pipe.transformer.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["model", "group", "sequential"])
def test_two_expert_pipeline_offloads_both_experts(pipes, mode):
    pipe = pipes("wan2.2-t2v-a14b")
    steps = 6  # the demo's shift keeps early steps above the boundary; enough steps reach the low-noise expert
    undo_plan(pipe)
    apply_plan(pipe, OffloadPlan(mode="none"), CPU)
    plain = generate(pipe, steps)
    w = pipe.transformer_2.blocks[0].ffn.net[2].weight
    w0 = w.data.clone()
    w.data.mul_(1.5)  # an edit on the low-noise expert only
    edited = generate(pipe, steps)
    w.data.copy_(w0)
    assert not torch.equal(edited, plain)
    apply_plan(pipe, OffloadPlan(mode=mode), CPU)
    try:
        hooked = {h.split(".")[0].split(":")[0] for h in active_hooks(pipe)}
        assert {"transformer", "transformer_2"} <= hooked
        assert torch.equal(generate(pipe, steps), plain)
        w.data.mul_(1.5)
        assert torch.equal(generate(pipe, steps), edited)
        w.data.copy_(w0)
        assert torch.equal(generate(pipe, steps), plain)
    finally:
        undo_plan(pipe)
    assert active_hooks(pipe) == []


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["group", "sequential"])
def test_cuda_streams_match_none(pipes, mode):
    pipe = pipes("wan2.1-t2v-1.3b")
    cuda = torch.device("cuda")
    apply_plan(pipe, OffloadPlan(mode="none"), cuda)
    plain = generate(pipe)
    apply_plan(pipe, OffloadPlan(mode=mode), cuda)
    try:
        from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook

        assert _get_top_level_group_offload_hook(pipe.transformer).group.stream is not None or mode == "sequential"
        torch.testing.assert_close(generate(pipe), plain)
        restore = lora_like_edit(pipe)
        edited = generate(pipe)
        restore()
        assert not torch.equal(edited, plain)
    finally:
        undo_plan(pipe)
