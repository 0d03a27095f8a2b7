"""LoRA stacks on single-file experts: exact merges with W0 re-read from the file under its own key names, and
fp8 merges in fp32 with one deterministic rounding back to fp8 whose removal restores the file's bytes."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(comfy_tree, demo_model, tmp_path_factory):
    from engine.facade import Engine, Settings

    models = tmp_path_factory.mktemp("models-lora")
    (models / "demo").symlink_to(demo_model("wan2.2-t2v-a14b"))
    engine = Engine(Settings(models_dir=models, comfyui_dir=comfy_tree, allow_lora_paths_outside=True))
    return engine, {m.id: m for m in engine.model_infos()}, comfy_tree / "loras" / "demo"


def _bytes(t):
    import torch

    return t.detach().reshape(-1).view(torch.uint8).clone()


def _stack(*entries):
    from engine.types import LoraEntry, Stack

    return Stack(tuple(LoraEntry(file=str(f), weight=w, applies_to=a) for f, w, a in entries))


def test_single_file_merge_equals_the_folder_and_rereads_w0_from_the_file(env, loaded_experts):
    import torch

    engine, models, loras = env
    stack = _stack((loras / "anime-a14b-peft.safetensors", 0.8, "both"), (loras / "speed_high_noise.safetensors", 1.0, "high_noise"))
    folder, spec, folder_session = loaded_experts(engine, models["demo"])
    single, _, session = loaded_experts(engine, models["wan2.2_t2v_14B_fp32"])
    before = {e: {n: p.detach().clone() for n, p in m.named_parameters()} for e, m in single.items()}
    folder_session.apply(spec, stack, resolve=Path)
    session.apply(spec, stack, resolve=Path)
    stats = session.last_stats["experts"]
    assert all(s["file_backed"] == s["written"] > 0 and s["copied_bytes"] == 0 for s in stats.values()), stats
    for e in single:
        fp = dict(folder[e].named_parameters())
        for n, p in single[e].named_parameters():
            assert torch.equal(p, fp[n]), n
    session.apply(spec, _stack(), resolve=Path)
    for e, m in single.items():
        for n, p in m.named_parameters():
            assert torch.equal(_bytes(p), _bytes(before[e][n])), n


def test_fp8_merge_is_within_the_rounding_bound_and_removal_restores_the_bytes(env, loaded_experts):
    """Bound: each merged weight, dequantized, is within half an fp8 step of the fp32 reference
    W0*s + sum w*scale*(B@A): |got - ref| <= s * max(2^-4 * |ref/s|, 2^-10) (e4m3: 3 mantissa bits, subnormal
    step 2^-9), as long as |ref/s| <= 448."""
    import torch

    engine, models, loras = env
    info = models["wan2.2_t2v_14B_fp8_scaled"]
    experts, spec, session = loaded_experts(engine, info)
    s1 = _stack((loras / "anime-a14b-peft.safetensors", 0.8, "both"))
    s2 = _stack((loras / "anime-a14b-peft.safetensors", -1.5, "both"), (loras / "speed_low_noise.safetensors", 1.0, "low_noise"))
    original = {e: {n: _bytes(p) for n, p in m.named_parameters()} for e, m in experts.items()}
    scale0 = {e: {n: float(getattr(mod, "weight_scale", 1.0)) for n, mod in m.named_modules()} for e, m in experts.items()}
    shapes = {e: {n: tuple(p.shape) for n, p in m.named_parameters()} for e, m in experts.items()}
    from engine.lora.planning import plan_stack

    desired = plan_stack(engine.library, spec, s2, shapes, resolve=Path).desired

    session.apply(spec, s1, resolve=Path)
    session.apply(spec, s2, resolve=Path)  # history: s1 then s2
    after_history = {e: {n: _bytes(p) for n, p in m.named_parameters()} for e, m in experts.items()}
    worst = 0.0
    for e, m in experts.items():
        mods = dict(m.named_modules())
        for n, contribs in desired[e].items():
            p = dict(m.named_parameters())[n]
            owner = mods[n.rpartition(".")[0]]
            s = float(getattr(owner, "weight_scale", 1.0))  # the file's, or recomputed when the merge outgrew it
            w0 = torch.tensor(original[e][n].numpy()).view(p.dtype).reshape(p.shape).float()
            ref = w0 * scale0[e][n.rpartition(".")[0]] if p.dtype == torch.float8_e4m3fn else w0
            for c in contribs:
                ref = ref + c.weight * c.patch.scale * (c.patch.up.float() @ c.patch.down.float()).reshape(ref.shape)
            got = p.detach().float() * (s if p.dtype == torch.float8_e4m3fn else 1.0)
            if p.dtype == torch.float8_e4m3fn:
                assert (ref / s).abs().max() <= 448 * (1 + 1e-5)
                bound = s * torch.clamp((ref / s).abs() * 2.0 ** -4, min=2.0 ** -10)
                assert bool(((got - ref).abs() <= bound * (1 + 1e-6)).all()), n
                worst = max(worst, float(((got - ref).abs() / bound).max()))
            else:
                assert torch.allclose(got, ref, atol=1e-6), n
    assert 0 < worst <= 1.0
    session.apply(spec, _stack(), resolve=Path)
    for e, m in experts.items():  # scales back to the file's
        assert all(float(getattr(mod, "weight_scale", 1.0)) == scale0[e][n] for n, mod in m.named_modules())
    for e, m in experts.items():
        for n, p in m.named_parameters():
            assert torch.equal(_bytes(p), original[e][n]), n
    session.apply(spec, s2, resolve=Path)  # s2 fresh == s2 after s1: depends only on W0 and the stack
    for e, m in experts.items():
        for n, p in m.named_parameters():
            assert torch.equal(_bytes(p), after_history[e][n]), n
    session.apply(spec, _stack(), resolve=Path)
