"""Exactness of merged application: history independence, bit-exact removal, expert routing, offload hooks."""
from __future__ import annotations

import pytest
import torch

from engine.models.catalog import get_spec
from engine.lora import LoraCapExceeded, LoraFormatError, LoraIncompatibleError, LoraManager
from engine.types import LoraEntry, Stack
from lora_factory import random_lowrank, snapshot, tiny_transformer, write_lightx2v, write_lora, write_two_expert

T2V = "demo-wan2.1-t2v-1.3b"
A14B = "demo-wan2.2-t2v-a14b"


def _state_equal(model, ref) -> bool:
    return all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


@pytest.fixture
def three_loras(tmp_path):
    model = tiny_transformer()
    write_lora(tmp_path / "a.safetensors", "wan", random_lowrank(model, seed=11), alpha=2.0)
    write_lora(tmp_path / "b.safetensors", "peft", random_lowrank(model, seed=12))
    write_lora(tmp_path / "c.safetensors", "kohya", random_lowrank(model, seed=13, targets=["blocks.1.ffn.net.2"]), alpha=4.0)
    return tmp_path


def S(*entries):
    return Stack(tuple(LoraEntry(f, weight=w) for f, w in entries))


def test_stack_then_other_then_none_restores_w0_bit_for_bit(three_loras):
    model = tiny_transformer()
    w0 = snapshot(model)
    mgr = LoraManager(three_loras)
    experts = {"single": model}
    mgr.apply(experts, get_spec(T2V), S(("a.safetensors", 1.0), ("b.safetensors", -0.5)))
    assert not _state_equal(model, w0)
    mgr.apply(experts, get_spec(T2V), S(("c.safetensors", 2.0)))
    mgr.apply(experts, get_spec(T2V), Stack())
    assert _state_equal(model, w0)
    mgr.apply(experts, get_spec(T2V), S(("a.safetensors", 1.0)))
    mgr.restore()
    assert _state_equal(model, w0)


def test_result_depends_only_on_the_stack_not_the_history(three_loras):
    s1 = S(("a.safetensors", 1.0), ("b.safetensors", 0.3), ("c.safetensors", -1.0))
    s2 = S(("b.safetensors", 0.8), ("c.safetensors", 1.0))
    edited = tiny_transformer()
    mgr = LoraManager(three_loras)
    mgr.apply({"single": edited}, get_spec(T2V), s1)
    mgr.apply({"single": edited}, get_spec(T2V), S(("a.safetensors", 0.2)))
    mgr.apply({"single": edited}, get_spec(T2V), s2)
    fresh = tiny_transformer()
    LoraManager(three_loras).apply({"single": fresh}, get_spec(T2V), s2)
    assert _state_equal(edited, snapshot(fresh))


def test_weight_zero_equals_no_stack(three_loras):
    model = tiny_transformer()
    w0 = snapshot(model)
    res = LoraManager(three_loras).apply({"single": model}, get_spec(T2V), S(("a.safetensors", 0.0)))
    assert res[0]["status"] == "skipped" and "weight 0" in res[0]["reason"]
    assert res[0]["coverage"]["applied"] == res[0]["coverage"]["total"]  # it would fit; it just does nothing
    assert _state_equal(model, w0)


def test_one_slider_change_remerges_only_that_loras_layers_and_never_rereads(three_loras, monkeypatch):
    model = tiny_transformer()
    mgr = LoraManager(three_loras)
    experts = {"single": model}
    mgr.apply(experts, get_spec(T2V), S(("a.safetensors", 1.0), ("c.safetensors", 1.0)))
    import engine.lora.library as manager_mod

    def no_read(*a, **k):
        raise AssertionError("a cached LoRA file was read again")

    monkeypatch.setattr(manager_mod, "read_lora_file", no_read)
    mgr.apply(experts, get_spec(T2V), S(("a.safetensors", 1.0), ("c.safetensors", 0.5)))
    stats = mgr.last_stats["experts"]["single"]
    assert stats["written"] == 1  # only blocks.1.ffn.net.2.weight carries c
    monkeypatch.undo()
    fresh = tiny_transformer()
    LoraManager(three_loras).apply({"single": fresh}, get_spec(T2V), S(("a.safetensors", 1.0), ("c.safetensors", 0.5)))
    assert _state_equal(model, snapshot(fresh))


def test_unchanged_fingerprint_does_nothing(three_loras):
    model = tiny_transformer()
    mgr = LoraManager(three_loras)
    stack = S(("a.safetensors", 1.0))
    first = mgr.apply({"single": model}, get_spec(T2V), stack)
    with torch.no_grad():  # an outside write would be undone by a re-merge; an unchanged stack must not touch it
        model.blocks[0].attn1.to_q.weight[0, 0] += 1.0
    marker = model.blocks[0].attn1.to_q.weight[0, 0].item()
    again = mgr.apply({"single": model}, get_spec(T2V), stack)
    assert mgr.last_stats["unchanged"] is True
    assert model.blocks[0].attn1.to_q.weight[0, 0].item() == marker
    assert again == first


def test_two_expert_file_moves_only_the_intended_expert(tmp_path):
    high_m, low_m = tiny_transformer(width=32, seed=0), tiny_transformer(width=32, seed=1)
    h0, l0 = snapshot(high_m), snapshot(low_m)
    high_part = random_lowrank(high_m, seed=3, targets=["blocks.0.attn1.to_q"])
    low_part = random_lowrank(low_m, seed=4, targets=["blocks.1.ffn.net.0.proj"])
    write_two_expert(tmp_path / "both.safetensors", high_part, low_part, alpha=4.0)
    experts = {"high_noise": high_m, "low_noise": low_m}
    res = LoraManager(tmp_path).apply(experts, get_spec(A14B), S(("both.safetensors", 1.0)))
    assert res[0]["coverage"]["applied"] == res[0]["coverage"]["total"] == 6
    changed_high = [k for k, v in high_m.state_dict().items() if not torch.equal(v, h0[k])]
    changed_low = [k for k, v in low_m.state_dict().items() if not torch.equal(v, l0[k])]
    assert changed_high == ["blocks.0.attn1.to_q.weight"]
    assert changed_low == ["blocks.1.ffn.net.0.proj.weight"]


def test_applies_to_and_low_noise_weight_route_per_expert(tmp_path):
    high_m, low_m = tiny_transformer(width=32, seed=0), tiny_transformer(width=32, seed=1)
    h0, l0 = snapshot(high_m), snapshot(low_m)
    write_lora(tmp_path / "x.safetensors", "wan", random_lowrank(high_m), alpha=4.0)
    mgr = LoraManager(tmp_path)
    experts = {"high_noise": high_m, "low_noise": low_m}
    res = mgr.apply(experts, get_spec(A14B), Stack((LoraEntry("x.safetensors", 1.0, "low_noise"),)))
    assert _state_equal(high_m, h0) and not _state_equal(low_m, l0)
    assert res[0]["weights"] == {"high_noise": 0.0, "low_noise": 1.0}
    res = mgr.apply(experts, get_spec(A14B), Stack((LoraEntry("x.safetensors", 1.0, "both", low_noise_weight=0.0),)))
    assert not _state_equal(high_m, h0) and _state_equal(low_m, l0)
    assert res[0]["weights"] == {"high_noise": 1.0, "low_noise": 0.0}


def test_single_expert_model_warns_for_expert_entries(three_loras):
    model = tiny_transformer()
    res = LoraManager(three_loras).apply(
        {"single": model}, get_spec(T2V), Stack((LoraEntry("a.safetensors", 1.0, "high_noise"),)))
    assert res[0]["status"] == "applied"
    assert any("has one expert" in w for w in res[0]["warnings"])


def test_wrong_base_is_refused_with_the_family_message(tmp_path):
    big = tiny_transformer(width=32)
    write_lora(tmp_path / "big.safetensors", "wan", random_lowrank(big), alpha=4.0)
    small = tiny_transformer(width=24, in_channels=48)
    w0 = snapshot(small)
    mgr = LoraManager(tmp_path)
    with pytest.raises(LoraIncompatibleError, match=r"made for demo Wan 14B \(width 32\); this model is .*TI2V 5B.*\(width 24\)"):
        mgr.apply({"single": small}, get_spec("demo-wan2.2-ti2v-5b"), S(("big.safetensors", 1.0)))
    assert _state_equal(small, w0)
    listed = {r["file"]: r for r in mgr.list_loras(get_spec("demo-wan2.2-ti2v-5b"))}
    assert listed["big.safetensors"]["compatible"] is False
    assert "width 32" in listed["big.safetensors"]["reason"]
    assert {r["file"]: r for r in mgr.list_loras(get_spec(A14B))}["big.safetensors"]["compatible"] is True


def test_failing_file_stops_or_is_skipped_and_reported(three_loras):
    (three_loras / "broken.safetensors").write_bytes(b"\x00" * 5)
    model = tiny_transformer()
    w0 = snapshot(model)
    mgr = LoraManager(three_loras)
    stack = S(("a.safetensors", 1.0), ("broken.safetensors", 1.0))
    with pytest.raises(LoraFormatError, match="broken.safetensors"):
        mgr.apply({"single": model}, get_spec(T2V), stack)
    assert _state_equal(model, w0)
    res = mgr.apply({"single": model}, get_spec(T2V), stack, skip_failing=True)
    assert [r["status"] for r in res] == ["applied", "failed"]
    assert "broken.safetensors" in res[1]["reason"]


def test_cap_is_counted_per_expert(three_loras):
    mgr = LoraManager(three_loras)
    spec = get_spec(A14B)  # demo cap 3
    four = Stack(tuple(LoraEntry(f"{n}.safetensors", 1.0, "high_noise") for n in "abca"))
    with pytest.raises(LoraCapExceeded, match=r"demo-wan2.2-t2v-a14b takes at most 3 enabled LoRAs on the high-noise expert"):
        mgr.check(spec, four)
    split = Stack(tuple(LoraEntry(f"{n}.safetensors", 1.0, a) for n, a in
                        zip("abca", ("high_noise", "high_noise", "low_noise", "low_noise"))))
    assert mgr.check(spec, split) == []
    disabled = Stack(four.entries[:3] + (LoraEntry("a.safetensors", 1.0, "high_noise", enabled=False),))
    assert mgr.check(spec, disabled) == []


def test_entries_cannot_escape_the_lora_folder(three_loras, tmp_path_factory):
    from engine.types import RequestError

    mgr = LoraManager(three_loras)
    model = tiny_transformer()
    for bad in ("../x.safetensors", str(three_loras / "a.safetensors")):
        with pytest.raises(RequestError):
            mgr.apply({"single": model}, get_spec(T2V), S((bad, 1.0)))
    res = mgr.apply({"single": model}, get_spec(T2V), S((str(three_loras / "a.safetensors"), 1.0)),
                    resolve=lambda f: __import__("pathlib").Path(f))
    assert res[0]["status"] == "applied"


def test_lightx2v_and_lowrank_on_the_same_weight(tmp_path):
    model = tiny_transformer()
    w0 = snapshot(model)
    diffs = {"blocks.0.attn1.to_q.weight": torch.randn(16, 16) * 0.01, "blocks.0.attn1.to_q.bias": torch.randn(16) * 0.01}
    write_lightx2v(tmp_path / "d.safetensors", diffs)
    lowrank = random_lowrank(model, targets=["blocks.0.attn1.to_q"])
    write_lora(tmp_path / "l.safetensors", "peft", lowrank)
    mgr = LoraManager(tmp_path)
    mgr.apply({"single": model}, get_spec(T2V), S(("d.safetensors", 1.0), ("l.safetensors", 0.5)))
    from lora_factory import expected

    want = expected(w0, [(lowrank, 0.5, 1.0)], [(diffs, 1.0)])
    for name, value in want.items():
        assert torch.allclose(model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    mgr.restore()
    assert _state_equal(model, w0)


def test_group_offloading_hooks_on_cpu(three_loras):
    """Merging through diffusers group offloading (block level and leaf level) on CPU.

    On CPU the hooks move `.data` between the same device, so this checks that writes go into
    `param.data` in place and survive onload/offload cycles and a forward pass. Only CUDA can check
    the stream path (pinned CPU copies in `cpu_param_dict` restored on offload; our merge mirrors
    writes into them) and real host<->device moves: see the gpu-marked test below.
    """
    from diffusers.hooks import apply_group_offloading

    for kind in ("block_level", "leaf_level"):
        model = tiny_transformer()
        w0 = snapshot(model)
        ref = tiny_transformer()
        stack = S(("a.safetensors", 1.0), ("b.safetensors", 0.5))
        LoraManager(three_loras).apply({"single": ref}, get_spec(T2V), stack)
        kwargs = {"num_blocks_per_group": 1} if kind == "block_level" else {}
        apply_group_offloading(model, onload_device=torch.device("cpu"), offload_type=kind, **kwargs)
        mgr = LoraManager(three_loras)
        mgr.apply({"single": model}, get_spec(T2V), stack)
        x = torch.randn(1, 16, 1, 4, 4)
        t = torch.tensor([500])
        text = torch.randn(1, 8, 32)
        with torch.no_grad():
            out = model(x, t, text, return_dict=False)[0]
            want = ref(x, t, text, return_dict=False)[0]
        assert torch.equal(out, want), kind
        assert _state_equal(model, snapshot(ref))
        mgr.restore()
        with torch.no_grad():
            model(x, t, text, return_dict=False)
        assert _state_equal(model, w0), kind


@pytest.mark.gpu
def test_group_offloading_with_cuda_streams(three_loras):
    from diffusers.hooks import apply_group_offloading

    model = tiny_transformer()
    w0 = snapshot(model)
    ref = tiny_transformer().cuda()
    stack = S(("a.safetensors", 1.0))
    LoraManager(three_loras).apply({"single": ref}, get_spec(T2V), stack)
    apply_group_offloading(model, onload_device=torch.device("cuda"), offload_type="block_level",
                           num_blocks_per_group=1, use_stream=True)
    mgr = LoraManager(three_loras)
    mgr.apply({"single": model}, get_spec(T2V), stack)
    args = (torch.randn(1, 16, 1, 4, 4, device="cuda"), torch.tensor([500], device="cuda"), torch.randn(1, 8, 32, device="cuda"))
    with torch.no_grad():
        assert torch.equal(model(*args, return_dict=False)[0], ref(*args, return_dict=False)[0])
    mgr.restore()
    with torch.no_grad():
        model(*args, return_dict=False)
    assert all(torch.equal(v.cpu(), w0[k]) for k, v in model.state_dict().items())


def test_parsed_cache_keeps_the_applied_stack_within_its_budget(three_loras, monkeypatch):
    model = tiny_transformer()
    mgr = LoraManager(three_loras, cache_entries=1)
    stack = S(("a.safetensors", 1.0), ("b.safetensors", 1.0))
    mgr.apply({"single": model}, get_spec(T2V), stack)
    mgr.load(three_loras / "c.safetensors")  # an inspection of another file must not evict the stack
    import engine.lora.library as manager_mod

    monkeypatch.setattr(manager_mod, "read_lora_file", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    mgr.apply({"single": model}, get_spec(T2V), S(("a.safetensors", 0.5), ("b.safetensors", 1.0)))
    assert len(mgr._parsed) == 2
