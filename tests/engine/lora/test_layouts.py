"""Every layout trainers write, written here with their real key names, merges exactly against an fp64
reference computed independently in this file; PEFT metadata cases match diffusers' own load + fuse;
coverage accounts for every key of every file."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from engine.models.catalog import get_spec
from engine.lora import LoraFormatError, LoraManager
from engine.lora.names import diffusers_to_wan
from engine.types import LoraEntry, Stack
from lora_factory import snapshot, tiny_transformer

T2V = "demo-wan2.1-t2v-1.3b"
A14B = "demo-wan2.2-t2v-a14b"
Q, FF, PATCH = "blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj", "patch_embedding"


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _apply(folder, file, weight=1.0, model=None, spec=T2V, **entry):
    model = model or tiny_transformer()
    w0 = snapshot(model)
    rows = LoraManager(folder).apply({"single": model}, get_spec(spec), Stack((LoraEntry(file, weight=weight, **entry),)))
    return model, w0, rows[0]


def _check(model, w0, want: dict[str, torch.Tensor], rtol=1e-5, atol=1e-6):
    """Parameters in `want` equal the fp64 reference (rounded by fp32 storage); all others are untouched."""
    for name, value in model.state_dict().items():
        if name in want:
            torch.testing.assert_close(value.double(), want[name], rtol=rtol, atol=atol, msg=name)
            assert not torch.equal(value, w0[name]), name
        else:
            assert torch.equal(value, w0[name]), name


def _coverage_complete(row, n_keys):
    cov = row["coverage"]
    assert cov["total"] == n_keys
    assert cov["applied"] + len(cov["skipped"]) + len(cov["unmatched"]) + len(cov["shape_mismatch"]) == n_keys


def _lowrank(out_f, in_f, r, seed):
    g = _g(seed)
    return torch.randn(r, in_f, generator=g) * 0.2, torch.randn(out_f, r, generator=g) * 0.2


# -- plain low-rank layouts -------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["videox_fun", "kohya", "wan_alpha"])
def test_lowrank_layouts_merge_exactly(tmp_path, layout):
    base = tiny_transformer()
    params = dict(base.named_parameters())
    sd, want = {}, {}
    for i, mod in enumerate((Q, FF, "blocks.0.attn2.to_out.0")):
        w = params[mod + ".weight"]
        down, up = _lowrank(w.shape[0], w.shape[1], 4, i)
        wan = diffusers_to_wan(mod)
        name = {"videox_fun": "lora_unet__" + wan.replace(".", "_"), "kohya": "lora_unet_" + wan.replace(".", "_"),
                "wan_alpha": "diffusion_model." + wan}[layout]
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(2.0)
        want[mod + ".weight"] = w.double() + 0.7 * (2.0 / 4) * (up.double() @ down.double())
    save_file(sd, str(tmp_path / "l.safetensors"))
    model, w0, row = _apply(tmp_path, "l.safetensors", 0.7)
    _check(model, w0, want)
    _coverage_complete(row, len(sd))
    assert row["coverage"]["applied"] == len(sd)


def test_lightx2v_modulation_diffs_in_lightx2v_layout(tmp_path):
    base = tiny_transformer()
    p = dict(base.named_parameters())
    g = _g(5)
    sd = {"diffusion_model.blocks.0.diff_m": torch.randn(1, 6, 16, generator=g) * 0.1,
          "diffusion_model.head.diff_m": torch.randn(1, 2, 16, generator=g) * 0.1,
          "diffusion_model.blocks.1.self_attn.q.diff": torch.randn(16, 16, generator=g) * 0.1,
          "diffusion_model.blocks.1.self_attn.q.diff_b": torch.randn(16, generator=g) * 0.1}
    save_file(sd, str(tmp_path / "x.safetensors"))
    model, w0, row = _apply(tmp_path, "x.safetensors", 0.5)
    want = {"blocks.0.scale_shift_table": p["blocks.0.scale_shift_table"].double() + 0.5 * sd["diffusion_model.blocks.0.diff_m"].double(),
            "scale_shift_table": p["scale_shift_table"].double() + 0.5 * sd["diffusion_model.head.diff_m"].double(),
            "blocks.1.attn1.to_q.weight": p["blocks.1.attn1.to_q.weight"].double() + 0.5 * sd["diffusion_model.blocks.1.self_attn.q.diff"].double(),
            "blocks.1.attn1.to_q.bias": p["blocks.1.attn1.to_q.bias"].double() + 0.5 * sd["diffusion_model.blocks.1.self_attn.q.diff_b"].double()}
    _check(model, w0, want)
    assert row["coverage"]["applied"] == 4 == row["coverage"]["total"]


def test_ai_toolkit_combined_wan22_file_routes_to_high_and_low(tmp_path):
    high, low = tiny_transformer(width=32, seed=1), tiny_transformer(width=32, seed=2)
    ph, pl = dict(high.named_parameters()), dict(low.named_parameters())
    d1, u1 = _lowrank(32, 32, 4, 1)
    d2, u2 = _lowrank(32, 32, 4, 2)
    sd = {f"diffusion_model.transformer_1.{Q}.lora_A.weight": d1, f"diffusion_model.transformer_1.{Q}.lora_B.weight": u1,
          f"diffusion_model.transformer_2.{Q}.lora_A.weight": d2, f"diffusion_model.transformer_2.{Q}.lora_B.weight": u2}
    save_file(sd, str(tmp_path / "both.safetensors"))
    w0h, w0l = snapshot(high), snapshot(low)
    rows = LoraManager(tmp_path).apply({"high_noise": high, "low_noise": low}, get_spec(A14B),
                                       Stack((LoraEntry("both.safetensors", weight=1.0),)))
    _check(high, w0h, {Q + ".weight": w0h[Q + ".weight"].double() + u1.double() @ d1.double()})
    _check(low, w0l, {Q + ".weight": w0l[Q + ".weight"].double() + u2.double() @ d2.double()})
    assert rows[0]["coverage"]["applied"] == 4 == rows[0]["coverage"]["total"]


# -- LyCORIS LoKr / LoHa ----------------------------------------------------------------------------

def _kron(w1, w2):
    """Kronecker product written out: K[i*b + j, k*d + l] = w1[i, k] * w2[j, l]."""
    a, c = w1.shape
    b, d = w2.shape
    return torch.einsum("ik,jl->ijkl", w1, w2).reshape(a * b, c * d)


def test_lokr_full_factors_scale_one_even_with_ai_toolkit_alpha(tmp_path):
    """ai-toolkit names (lycoris_blocks_...), full lokr_w1 + lokr_w2, alpha 9999999999 saved in fp16 (= inf)."""
    base = tiny_transformer()
    p = dict(base.named_parameters())
    g = _g(7)
    w1, w2 = torch.randn(4, 2, generator=g), torch.randn(4, 8, generator=g) * 0.1  # [a, c], [b, d]: 16 x 16
    sd = {"lycoris_blocks_0_attn1_to_q.lokr_w1": w1, "lycoris_blocks_0_attn1_to_q.lokr_w2": w2,
          "lycoris_blocks_0_attn1_to_q.alpha": torch.tensor(9999999999.0).half()}
    assert torch.isinf(sd["lycoris_blocks_0_attn1_to_q.alpha"].float())
    save_file(sd, str(tmp_path / "k.safetensors"))
    model, w0, row = _apply(tmp_path, "k.safetensors", 0.8)
    _check(model, w0, {Q + ".weight": p[Q + ".weight"].double() + 0.8 * _kron(w1.double(), w2.double())})
    assert "LyCORIS LoKr" in LoraManager(tmp_path).load(tmp_path / "k.safetensors").formats
    _coverage_complete(row, 3)


def test_lokr_low_rank_factors_use_alpha_over_rank(tmp_path):
    base = tiny_transformer()
    p = dict(base.named_parameters())
    g = _g(8)
    # Wan names, w1 full [a, c] and w2 = w2_a [b, r] @ w2_b [r, d]; then both factors low rank on the ffn
    w1, w2a, w2b = torch.randn(2, 4, generator=g), torch.randn(8, 3, generator=g), torch.randn(3, 4, generator=g) * 0.1
    f_w1a, f_w1b = torch.randn(4, 2, generator=g), torch.randn(2, 4, generator=g)  # ffn.0: out 32, in 16
    f_w2a, f_w2b = torch.randn(8, 2, generator=g), torch.randn(2, 4, generator=g) * 0.1
    sd = {"diffusion_model.blocks.0.self_attn.q.lokr_w1": w1, "diffusion_model.blocks.0.self_attn.q.lokr_w2_a": w2a,
          "diffusion_model.blocks.0.self_attn.q.lokr_w2_b": w2b, "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(1.5),
          "diffusion_model.blocks.1.ffn.0.lokr_w1_a": f_w1a, "diffusion_model.blocks.1.ffn.0.lokr_w1_b": f_w1b,
          "diffusion_model.blocks.1.ffn.0.lokr_w2_a": f_w2a, "diffusion_model.blocks.1.ffn.0.lokr_w2_b": f_w2b,
          "diffusion_model.blocks.1.ffn.0.alpha": torch.tensor(4.0)}
    save_file(sd, str(tmp_path / "k.safetensors"))
    model, w0, row = _apply(tmp_path, "k.safetensors", 1.0)
    dq = (1.5 / 3) * _kron(w1.double(), w2a.double() @ w2b.double())
    dff = (4.0 / 2) * _kron(f_w1a.double() @ f_w1b.double(), f_w2a.double() @ f_w2b.double())
    _check(model, w0, {Q + ".weight": p[Q + ".weight"].double() + dq, FF + ".weight": p[FF + ".weight"].double() + dff})
    _coverage_complete(row, len(sd))


def test_lokr_tucker_on_the_patch_embedding_conv(tmp_path):
    base = tiny_transformer()
    w = dict(base.named_parameters())[PATCH + ".weight"]  # [16, 16, 1, 2, 2]
    g = _g(9)
    r = 2
    w1 = torch.randn(4, 4, generator=g)  # a=4, c=4 ; b=4, d=4
    t2, w2a, w2b = torch.randn(r, r, 1, 2, 2, generator=g), torch.randn(r, 4, generator=g), torch.randn(r, 4, generator=g) * 0.1
    sd = {"diffusion_model.patch_embedding.lokr_w1": w1, "diffusion_model.patch_embedding.lokr_t2": t2,
          "diffusion_model.patch_embedding.lokr_w2_a": w2a, "diffusion_model.patch_embedding.lokr_w2_b": w2b,
          "diffusion_model.patch_embedding.alpha": torch.tensor(1.0)}
    save_file(sd, str(tmp_path / "t.safetensors"))
    model, w0, row = _apply(tmp_path, "t.safetensors", 1.0)
    # w2[p, q, kernel] = sum_ij t2[i, j, kernel] w2a[i, p] w2b[j, q]; ΔW[(x, p), (y, q), kernel] = w1[x, y] w2[p, q, kernel]
    w2 = torch.einsum("ijtuv,ip,jq->pqtuv", t2.double(), w2a.double(), w2b.double())
    delta = torch.einsum("xy,pqtuv->xpyqtuv", w1.double(), w2).reshape(16, 16, 1, 2, 2) * (1.0 / r)
    _check(model, w0, {PATCH + ".weight": w.double() + delta})
    _coverage_complete(row, len(sd))


def test_loha_merges_the_hadamard_product(tmp_path):
    base = tiny_transformer()
    p = dict(base.named_parameters())
    g = _g(10)
    r = 3
    t = [torch.randn(16, r, generator=g), torch.randn(r, 16, generator=g), torch.randn(16, r, generator=g),
         torch.randn(r, 16, generator=g) * 0.1]
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    sd = {f"lora_unet_blocks_0_self_attn_q.{n}": v for n, v in zip(names, t)}
    sd["lora_unet_blocks_0_self_attn_q.alpha"] = torch.tensor(6.0)
    save_file(sd, str(tmp_path / "h.safetensors"))
    model, w0, row = _apply(tmp_path, "h.safetensors", 0.5)
    a, b, c, d = (x.double() for x in t)
    want = p[Q + ".weight"].double() + 0.5 * (6.0 / r) * ((a @ b) * (c @ d))
    _check(model, w0, {Q + ".weight": want})
    _coverage_complete(row, 5)


def test_loha_tucker_is_refused_for_its_layer_with_the_reason(tmp_path):
    g = _g(11)
    sd = {f"lora_unet_blocks_0_self_attn_q.{n}": torch.randn(4, 4, generator=g)
          for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")}
    save_file(sd, str(tmp_path / "h.safetensors"))
    with pytest.raises(LoraFormatError, match="LoHa with Tucker factors"):
        _apply(tmp_path, "h.safetensors")


# -- DoRA --------------------------------------------------------------------------------------------

def _dora_ref(w0, delta, m, axis, strength, style):
    if style == "peft":
        v = w0 + strength * delta
        return m.reshape(-1, 1) * v / v.norm(dim=1, keepdim=True)
    v = w0 + delta
    norm = v.norm(dim=axis, keepdim=True) + torch.finfo(torch.float32).eps
    return v * (strength * (m / norm - 1) + 1)


@pytest.mark.parametrize("axis", [1, 0])  # dora_scale [out, 1] (norm per row) and [1, in] (per column)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_lycoris_dora_scale(tmp_path, axis, strength):
    base = tiny_transformer()
    w = dict(base.named_parameters())[FF + ".weight"].double()  # [32, 16]
    down, up = _lowrank(32, 16, 4, 12)
    m_shape = (32, 1) if axis == 1 else (1, 16)
    m = (w.norm(dim=axis, keepdim=True) * (1 + 0.3 * torch.rand(m_shape, generator=_g(13)).double())).float()
    base_key = "diffusion_model.blocks.1.ffn.0"
    sd = {f"{base_key}.lora_down.weight": down, f"{base_key}.lora_up.weight": up, f"{base_key}.alpha": torch.tensor(8.0),
          f"{base_key}.dora_scale": m}
    save_file(sd, str(tmp_path / "d.safetensors"))
    model, w0, row = _apply(tmp_path, "d.safetensors", strength)
    delta = 2.0 * up.double() @ down.double()
    _check(model, w0, {FF + ".weight": _dora_ref(w, delta, m.double(), axis, strength, "lycoris")})
    _coverage_complete(row, 4)
    # removal gives W0 back bit for bit, after a DoRA merge computed from W0
    mgr = LoraManager(tmp_path)
    mgr.apply({"single": model}, get_spec(T2V), Stack())


def test_dora_after_another_lora_is_computed_in_stack_order_and_removal_restores(tmp_path):
    base = tiny_transformer()
    w = dict(base.named_parameters())[Q + ".weight"].double()
    d1, u1 = _lowrank(16, 16, 2, 20)
    d2, u2 = _lowrank(16, 16, 2, 21)
    m = (w.norm(dim=1) * 1.2).float()
    save_file({f"transformer.{Q}.lora_A.weight": d1, f"transformer.{Q}.lora_B.weight": u1}, str(tmp_path / "a.safetensors"))
    save_file({f"transformer.{Q}.lora_A.weight": d2, f"transformer.{Q}.lora_B.weight": u2,
               f"transformer.{Q}.lora_magnitude_vector.weight": m}, str(tmp_path / "d.safetensors"))
    model = tiny_transformer()
    w0 = snapshot(model)
    mgr = LoraManager(tmp_path)
    stack = Stack((LoraEntry("a.safetensors", weight=0.5), LoraEntry("d.safetensors", weight=0.7)))
    mgr.apply({"single": model}, get_spec(T2V), stack)
    after_a = w + 0.5 * u1.double() @ d1.double()
    want = _dora_ref(after_a, u2.double() @ d2.double(), m.double(), 1, 0.7, "peft")
    _check(model, w0, {Q + ".weight": want})
    mgr.apply({"single": model}, get_spec(T2V), Stack((LoraEntry("d.safetensors", weight=1.0),)))
    _check(model, w0, {Q + ".weight": _dora_ref(w, u2.double() @ d2.double(), m.double(), 1, 1.0, "peft")})
    mgr.apply({"single": model}, get_spec(T2V), Stack())
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


# -- PEFT adapter metadata: diffusers is the oracle ---------------------------------------------------

def _diffusers_fused(folder, weight_name, strength):
    """diffusers' own load_lora_adapter + fuse_lora on a fresh tiny model, PEFT layers removed afterwards."""
    model = tiny_transformer()
    model.load_lora_adapter(str(folder), weight_name=weight_name, adapter_name="x", prefix="transformer",
                            local_files_only=True)
    model.set_adapters(["x"], weights=[strength])
    model.fuse_lora(adapter_names=["x"])
    model.unload_lora()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


PEFT_CASES = {
    "alpha_over_r": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=4, rank_pattern={"blocks.1.ffn.net.0.proj": 2},
                     alpha_pattern={"blocks.1.ffn.net.0.proj": 6, "attn1.to_q": 12}),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_peft_metadata_matches_diffusers_load_and_fuse(tmp_path, case, strength):
    from diffusers import WanPipeline

    cfg = {"target_modules": [Q, FF, "blocks.0.attn1.to_q"], "use_dora": False, "lora_dropout": 0.0,
           "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, **PEFT_CASES[case]}
    base = tiny_transformer()
    params = dict(base.named_parameters())
    layers = {}
    for i, mod in enumerate((Q, FF, "blocks.1.attn1.to_q")):
        w = params[mod + ".weight"]
        r = 2 if (case == "patterns" and mod == FF) else 4
        down, up = _lowrank(w.shape[0], w.shape[1], r, 30 + i)
        layers[f"{mod}.lora_A.weight"], layers[f"{mod}.lora_B.weight"] = down, up
    cfg["target_modules"] = [Q, FF, "blocks.1.attn1.to_q"]
    WanPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=layers, transformer_lora_adapter_metadata=cfg,
                                  safe_serialization=True)
    name = "pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(str(tmp_path / name), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert "transformer.r" in meta  # the pipeline's layout: every field prefixed
    oracle = _diffusers_fused(tmp_path, name, strength)
    model, w0, row = _apply(tmp_path, name, strength)
    changed = 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, oracle[k], rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(v, w0[k])
    assert changed == 3
    _coverage_complete(row, 6)
    if case == "rslora":  # and the scale really is alpha / sqrt(r), not alpha / r
        d, u = layers[f"{Q}.lora_A.weight"], layers[f"{Q}.lora_B.weight"]
        want = params[Q + ".weight"].double() + strength * 8 / math.sqrt(4) * u.double() @ d.double()
        torch.testing.assert_close(model.state_dict()[Q + ".weight"].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_peft_dora_matches_diffusers(tmp_path, strength):
    from diffusers import WanPipeline

    base = tiny_transformer()
    w = dict(base.named_parameters())[Q + ".weight"]
    down, up = _lowrank(16, 16, 4, 40)
    m = w.detach().norm(dim=1) * 1.3
    layers = {f"{Q}.lora_A.weight": down, f"{Q}.lora_B.weight": up, f"{Q}.lora_magnitude_vector.weight": m}
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": [Q], "use_dora": True, "rank_pattern": {}, "alpha_pattern": {}}
    WanPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=layers, transformer_lora_adapter_metadata=cfg,
                                  safe_serialization=True)
    name = "pytorch_lora_weights.safetensors"
    oracle = _diffusers_fused(tmp_path, name, strength)
    model, w0, row = _apply(tmp_path, name, strength)
    torch.testing.assert_close(model.state_dict()[Q + ".weight"], oracle[Q + ".weight"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.state_dict()[Q + ".weight"], w0[Q + ".weight"])
    _coverage_complete(row, 3)


# -- refusals keep their reason ------------------------------------------------------------------------

def test_other_bases_are_refused_with_their_family(tmp_path):
    g = _g(50)
    sdxl = {f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_{p}.weight": torch.randn(4, 4, generator=g)
            for p in ("down", "up")}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(LoraFormatError, match="Stable Diffusion / SDXL"):
        _apply(tmp_path, "sdxl.safetensors")
    flux = {f"diffusion_model.double_blocks.0.img_attn.qkv.lora_{p}.weight": torch.randn(4, 4, generator=g) for p in ("A", "B")}
    save_file(flux, str(tmp_path / "flux.safetensors"))
    with pytest.raises(LoraFormatError, match="Flux"):
        _apply(tmp_path, "flux.safetensors")


def test_i2v_image_keys_on_a_t2v_model_are_named_in_the_row(tmp_path):
    g = _g(51)
    sd = {}
    for mod in ("blocks.0.cross_attn.k_img", "blocks.0.cross_attn.v_img", "blocks.0.self_attn.q"):
        sd[f"diffusion_model.{mod}.lora_down.weight"] = torch.randn(2, 16, generator=g)
        sd[f"diffusion_model.{mod}.lora_up.weight"] = torch.randn(16, 2, generator=g)
    save_file(sd, str(tmp_path / "i2v.safetensors"))
    _, _, row = _apply(tmp_path, "i2v.safetensors")
    assert any("4 k_img/v_img keys have no target" in w for w in row["warnings"]), row["warnings"]
    _coverage_complete(row, 6)


# -- convert writes what the other tools read -----------------------------------------------------------

def test_convert_writes_lightx2v_modulation_layout_and_keeps_lycoris_layers(tmp_path):
    from engine.lora.convert import convert_file
    from safetensors.torch import load_file

    g = _g(60)
    sd = {"transformer.blocks.0.scale_shift_table.diff_m": torch.randn(1, 6, 16, generator=g),
          "transformer.scale_shift_table.diff_m": torch.randn(1, 2, 16, generator=g),
          f"transformer.{Q}.lokr_w1": torch.randn(4, 2, generator=g), f"transformer.{Q}.lokr_w2": torch.randn(4, 8, generator=g),
          f"transformer.{FF}.lora_A.weight": torch.randn(2, 16, generator=g),
          f"transformer.{FF}.lora_B.weight": torch.randn(32, 2, generator=g),
          f"transformer.{FF}.lora_magnitude_vector.weight": torch.rand(32, generator=g) + 1}
    save_file(sd, str(tmp_path / "src.safetensors"))
    report = convert_file(tmp_path / "src.safetensors", "comfy", tmp_path / "comfy.safetensors")
    out = load_file(str(tmp_path / "comfy.safetensors"))
    assert "diffusion_model.blocks.0.diff_m" in out and "diffusion_model.head.diff_m" in out
    assert "diffusion_model.blocks.0.self_attn.q.lokr_w1" in out
    assert out["diffusion_model.blocks.1.ffn.0.dora_scale"].shape == (32, 1) and "note" in report
    assert len(out) == len(sd)
    # the converted file merges to the same weights at strength 1
    a, w0, _ = _apply(tmp_path, "src.safetensors")
    b, _, _ = _apply(tmp_path, "comfy.safetensors")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-6, atol=1e-7)
