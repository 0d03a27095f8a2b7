"""`lora extract`: a known low-rank fine-tune comes back as a LoRA; bad input gets one clear error."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from engine.lora.extract import extract_lora
from engine.lora.shards import ShardWriter, TensorReader
from engine.types import RequestError

RANK = 3
CHANGED = ("blocks.0.attn1.to_q", "blocks.1.attn2.to_k", "blocks.0.ffn.net.0.proj", "condition_embedder.text_embedder.linear_1")


def low_rank_delta(shape, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) * 0.1


def finetune(component: str, state: dict) -> None:
    """A rank-3 change on a few Linear layers, a changed bias and a changed norm."""
    for i, module in enumerate(CHANGED):
        w = state[f"{module}.weight"]
        w += low_rank_delta(w.shape, RANK, seed=i + (10 if component == "transformer_2" else 0)).to(w.dtype)
    state["blocks.1.ffn.net.2.bias"] += 0.5
    state["blocks.0.norm2.weight"] *= 1.5


def read(path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def apply(source_dir, lora: dict, prefix: str, component: str = "transformer") -> dict:
    """Source weights plus the LoRA, by hand (W + alpha/rank * B @ A; bias + diff_b; weight + diff)."""
    with TensorReader(source_dir / component) as r:
        weights = {k: r.get(k).clone() for k in r.keys()}
    for key, value in lora.items():
        if not key.startswith(prefix + "."):
            continue
        module = key[len(prefix) + 1:]
        if module.endswith(".lora_A.weight"):
            m = module.removesuffix(".lora_A.weight")
            up = lora[f"{prefix}.{m}.lora_B.weight"].float()
            scale = lora[f"{prefix}.{m}.alpha"].item() / value.shape[0]
            weights[f"{m}.weight"] += scale * (up @ value.float())
        elif module.endswith(".diff_b"):
            weights[module.removesuffix(".diff_b") + ".bias"] += value.float()
        elif module.endswith(".diff"):
            weights[module.removesuffix(".diff") + ".weight"] += value.float()
    return weights


def test_extract_recovers_a_known_rank_r_delta(model_factory, tmp_path):
    source = model_factory()
    target = model_factory(edit=finetune)
    out = tmp_path / "extracted.safetensors"
    seen = []
    report = extract_lora(source, target, RANK, out, dtype="fp32", progress=lambda d, t, n: seen.append((d, t)))

    assert seen[-1][0] == seen[-1][1] > 0
    assert report["layers_lora"] == len(CHANGED)
    assert report["biases"] == 1 and report["layers_diff"] == 1
    assert report["max_rel_error"] < 1e-3
    assert {l["layer"] for l in report["layers"] if l["kind"] == "lora"} == {f"transformer.{m}" for m in CHANGED}

    lora, metadata = read(out)
    assert metadata["wanstack.rank"] == str(RANK)
    assert lora["transformer.blocks.0.attn1.to_q.lora_A.weight"].shape == (RANK, 16)
    assert lora["transformer.blocks.0.attn1.to_q.alpha"].item() == RANK
    assert "transformer.blocks.1.ffn.net.2.diff_b" in lora
    assert "transformer.blocks.0.norm2.diff" in lora
    assert not any("to_v" in k for k in lora)  # unchanged layers are skipped

    rebuilt = apply(source, lora, "transformer")
    with TensorReader(target / "transformer") as r:
        for name in r.keys():
            want = r.get(name)
            err = (torch.linalg.norm(rebuilt[name] - want) / torch.linalg.norm(want).clamp_min(1e-12)).item()
            assert err < 1e-3, name


def test_two_experts_give_one_file_with_both_prefixes(model_factory, tmp_path):
    source = model_factory(experts=2)
    target = model_factory(experts=2, edit=finetune)
    out = tmp_path / "both.safetensors"
    report = extract_lora(source, target, RANK, out, fmt="comfy")
    assert report["experts"] == ["transformer", "transformer_2"]
    lora, _ = read(out)
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in lora
    assert "diffusion_model_2.blocks.0.self_attn.q.lora_down.weight" in lora
    assert "diffusion_model_2.blocks.0.ffn.0.lora_up.weight" in lora
    assert "diffusion_model.blocks.0.norm3.diff" in lora  # diffusers norm2 -> Wan norm3
    assert report["max_rel_error"] < 1e-3


def test_diff_only_stores_exact_differences_in_bf16(model_factory, tmp_path):
    source = model_factory()
    target = model_factory(edit=finetune)
    out = tmp_path / "diff.safetensors"
    report = extract_lora(source, target, 0, out, diff_only=True, dtype="bf16")
    assert report["layers_lora"] == 0 and report["layers_diff"] == len(CHANGED) + 1
    lora, _ = read(out)
    assert all(v.dtype == torch.bfloat16 for v in lora.values())
    with TensorReader(source / "transformer") as s, TensorReader(target / "transformer") as t:
        name = "blocks.0.attn1.to_q.weight"
        assert torch.equal(lora["transformer.blocks.0.attn1.to_q.diff"], (t.get(name) - s.get(name)).bfloat16())


def test_mismatched_architectures_are_refused(model_factory, tmp_path):
    small = model_factory(width=16)
    wide = model_factory(width=24)
    with pytest.raises(RequestError, match="differ in attention_head_dim .*same architecture"):
        extract_lora(small, wide, 2, tmp_path / "x.safetensors")
    two = model_factory(experts=2)
    with pytest.raises(RequestError, match="source has transformer but target has transformer\\+transformer_2"):
        extract_lora(small, two, 2, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_rank_above_layer_size_is_refused(model_factory, tmp_path):
    source = model_factory()
    target = model_factory(edit=finetune)
    with pytest.raises(RequestError, match="--rank 17 is above the size of transformer layer .* pick --rank 16 or lower"):
        extract_lora(source, target, 17, tmp_path / "x.safetensors")


def test_output_inside_a_model_folder_is_refused(model_factory, tmp_path):
    source = model_factory()
    target = model_factory(edit=finetune)
    with pytest.raises(RequestError, match="inside the source model folder"):
        extract_lora(source, target, 2, source / "lora.safetensors")
    with pytest.raises(RequestError, match="inside the target model folder"):
        extract_lora(source, target, 2, target / "transformer" / "lora.safetensors")


def test_identical_models_have_nothing_to_extract(model_factory, tmp_path):
    a = model_factory()
    b = model_factory()
    with pytest.raises(RequestError, match="identical"):
        extract_lora(a, b, 2, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_shard_writer_output_reads_back(tmp_path):
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2, 2)}
    path = tmp_path / "w.safetensors"
    with ShardWriter(path, [(k, code, tuple(v.shape)) for k, v, code in
                            ((k, v, {torch.bfloat16: "BF16", torch.int64: "I64", torch.float32: "F32"}[v.dtype])
                             for k, v in tensors.items())], {"m": "1"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    back, metadata = read(path)
    assert metadata == {"m": "1"}
    for k, v in tensors.items():
        assert torch.equal(back[k], v)


@pytest.mark.parametrize("shape", [(48, 40), (1100, 1050)])  # full SVD, and the randomized one above 1024
def test_low_rank_is_exact_on_a_rank_r_matrix(shape):
    from engine.lora.extract import FULL_SVD_MAX_SIDE, low_rank

    assert (min(shape) > FULL_SVD_MAX_SIDE) == (shape[0] > 1000)
    delta = low_rank_delta(shape, 4, seed=3)
    up, down = low_rank(delta, 4)
    assert up.shape == (shape[0], 4) and down.shape == (4, shape[1])
    assert (torch.linalg.norm(delta - up @ down) / torch.linalg.norm(delta)).item() < 1e-5


def test_a_dtype_change_between_source_and_target_is_flagged(model_factory, tmp_path):
    source = model_factory()
    target = model_factory(edit=finetune, dtype=torch.bfloat16)
    report = extract_lora(source, target, RANK, tmp_path / "x.safetensors")
    assert report["warnings"] and "float32 but target weights are bfloat16" in report["warnings"][0]
    plain = extract_lora(source, model_factory(edit=finetune), RANK, tmp_path / "y.safetensors")
    assert plain["warnings"] == []
