"""The estimator: published checkpoints, geometry, and orderings that must always hold."""
from __future__ import annotations

import itertools

import pytest

from engine.models.catalog import CATALOG, get_spec
from engine.memory import Workload, estimate
from engine.memory.estimate import MODES

GB, GIB = 10**9, 1 << 30
REAL_TYPES = [t for t, s in CATALOG.items() if not s.demo]


def work(t, h, w, f, **kw):
    return Workload(get_spec(t), h, w, f, **kw)


# ---- published checkpoints (each names its source) ------------------------------------------------
def test_wan21_readme_1_3b_480p_with_offload_and_t5_on_cpu_is_8_19_gb():
    # Wan2.1 README: "The T2V-1.3B model requires only 8.19 GB VRAM" (832x480, 81 frames,
    # `--offload_model True --t5_cpu`). The VAE decode constant is calibrated on this figure.
    est = work("wan2.1-t2v-1.3b", 480, 832, 81).estimate("model", text_encoder_on_cpu=True)
    assert est.peak_bytes == pytest.approx(8.19 * GB, rel=0.05)


def test_diffusers_docs_1_3b_with_model_offload_needs_about_11_gb():
    # diffusers Wan docs (0.33): "The following example requires 11GB VRAM" for Wan2.1-T2V-1.3B with
    # enable_model_cpu_offload() (text encoder on the GPU while it runs), 480x832, 81 frames.
    est = work("wan2.1-t2v-1.3b", 480, 832, 81).estimate("model")
    assert est.peak_phase == "text_encode"
    assert est.peak_bytes == pytest.approx(11 * GIB, rel=0.10)


def test_diffusers_docs_14b_group_offload_needs_about_13_gb():
    # diffusers Wan docs: Wan2.1-T2V-14B with the UMT5 encoder group-offloaded at its top level
    # (so onloaded whole), the transformer leaf-level with streams and the fp32 VAE on the GPU:
    # "requires ~13GB of VRAM" at the pipeline defaults (480x832, 81 frames).
    w = work("wan2.1-t2v-14b", 480, 832, 81)
    seq = w.estimate("sequential")
    whole_te_phase = seq.weights["text_encoder"] + seq.weights["vae"] + seq.working["cuda_context"]
    assert whole_te_phase == pytest.approx(13 * GB, rel=0.10)
    assert max(seq.phases["denoise"], seq.phases["vae_decode"]) < 13 * GB  # the encoder phase is that doc's peak


def test_wan22_readme_ti2v_5b_720p_fits_a_24_gb_card():
    # Wan2.2 README: TI2V-5B 1280x704x121 with --offload_model True --convert_model_dtype --t5_cpu
    # "can run on a GPU with at least 24GB VRAM (e.g, RTX 4090 GPU)".
    est = work("wan2.2-ti2v-5b", 704, 1280, 121).estimate("model", text_encoder_on_cpu=True)
    assert 12 * GB < est.peak_bytes <= 24 * GIB


def test_wan22_readme_a14b_720p_with_offload_fits_80_gb():
    # Wan2.2 README: T2V-A14B 1280x720 with --offload_model True --convert_model_dtype "can run on a
    # GPU with at least 80GB VRAM"; one 14B expert alone is 28.6 GB of bf16 weights.
    est = work("wan2.2-t2v-a14b", 720, 1280, 81).estimate("model")
    assert 28.6 * GB < est.peak_bytes <= 80 * GB
    everything = work("wan2.2-t2v-a14b", 720, 1280, 81).estimate("none")
    assert everything.peak_bytes > 2 * 28.6 * GB


# ---- geometry -------------------------------------------------------------------------------------
def test_tokens_follow_wan_patching():
    assert work("wan2.1-t2v-1.3b", 480, 832, 81).tokens == 21 * 30 * 52  # 8x VAE, 2x2 patches, 4x time
    assert work("wan2.2-ti2v-5b", 704, 1280, 121).tokens == 31 * 22 * 40  # 5B: 16x VAE
    assert work("wan2.2-t2v-a14b", 720, 1280, 81).tokens == 21 * 45 * 80


def test_weights_per_component_and_experts():
    a14b = work("wan2.2-t2v-a14b", 480, 832, 81).weights()
    assert a14b["transformer"] == a14b["transformer_2"] == 2 * get_spec("wan2.2-t2v-a14b").memory.transformer_params
    assert a14b["vae"] == 4 * get_spec("wan2.2-t2v-a14b").memory.vae_params  # fp32 VAE
    assert "transformer_2" not in work("wan2.1-t2v-14b", 480, 832, 81).weights()
    assert "image_encoder" in work("wan2.1-i2v-14b", 480, 832, 81).weights()
    assert work("wan2.2-t2v-a14b", 480, 832, 81, experts=1).weights().keys() == \
        work("wan2.1-t2v-14b", 480, 832, 81).weights().keys()


# ---- orderings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", REAL_TYPES)
def test_more_frames_or_pixels_is_never_cheaper(model_type):
    spec = get_spec(model_type)
    m = spec.size_multiple
    sizes = [(m * 15, m * 26), (m * 30, m * 52), (m * 45, m * 80)]
    for mode, tiling, te_cpu in itertools.product(MODES, (False, True), (False, True)):
        last = None
        for frames in (17, 49, 81, 121):
            peak = work(model_type, 480, 832, frames).estimate(mode, tiling, te_cpu).peak_bytes
            assert last is None or peak >= last, (mode, tiling, frames)
            last = peak
        last = None
        for h, w in sizes:
            peak = work(model_type, h, w, 81).estimate(mode, tiling, te_cpu).peak_bytes
            assert last is None or peak >= last, (mode, tiling, h, w)
            last = peak
        # wider at the same height costs at least as much as narrower
        assert work(model_type, m * 30, m * 80, 81).estimate(mode, tiling, te_cpu).peak_bytes >= \
            work(model_type, m * 30, m * 52, 81).estimate(mode, tiling, te_cpu).peak_bytes


@pytest.mark.parametrize("model_type", REAL_TYPES)
@pytest.mark.parametrize("size", [(480, 832), (704, 1280)])
def test_heavier_modes_never_need_more_vram(model_type, size):
    w = work(model_type, *size, 81)
    peaks = [w.estimate(mode).peak_bytes for mode in MODES]
    assert peaks == sorted(peaks, reverse=True)
    for mode in MODES:
        assert w.estimate(mode, vae_tiling=True).peak_bytes <= w.estimate(mode).peak_bytes
        assert w.estimate(mode, text_encoder_on_cpu=True).peak_bytes <= w.estimate(mode).peak_bytes


def test_merged_loras_cost_a_transient_not_a_per_step_cost():
    base = work("wan2.2-t2v-a14b", 720, 1280, 81)
    one, three = (Workload(base.spec, 720, 1280, 81, loras=n) for n in (1, 3))
    for mode in MODES:
        assert one.estimate(mode).phases["denoise"] == base.estimate(mode).phases["denoise"]
    assert base.estimate("none").working["lora_merge"] == 0
    assert one.lora_merge_bytes() == three.lora_merge_bytes() == 14 * 13824 * 5120
    assert "lora_merge" in one.estimate("none").phases and "lora_merge" not in base.estimate("none").phases


def test_cpu_estimate_is_ram_in_fp32():
    est = estimate(get_spec("demo-wan2.1-t2v-1.3b"), 64, 64, 9, device="cpu")
    assert est.device == "cpu" and est.ram_bytes == est.peak_bytes
    real = estimate(get_spec("wan2.1-t2v-1.3b"), 480, 832, 81, device="cpu")
    assert real.weights["transformer"] == 4 * get_spec("wan2.1-t2v-1.3b").memory.transformer_params


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        work("wan2.1-t2v-1.3b", 480, 832, 81).estimate("turbo")
    with pytest.raises(ValueError, match="height must be positive"):
        work("wan2.1-t2v-1.3b", 0, 832, 81)


def test_fp8_text_encoder_is_priced_as_it_stays_in_memory():
    # engine/models/load.py keeps an fp8 umt5's Linear weights fp8 (1 byte each) and reads its token embedding
    # (vocab 256384 x d_model 4096) in the compute dtype; bf16/fp16/fp32 files are cast at load.
    spec = get_spec("wan2.2-t2v-a14b")
    p, emb = spec.memory.text_encoder_params, 256_384 * 4096
    base, fp8 = work("wan2.2-t2v-a14b", 480, 832, 81), work("wan2.2-t2v-a14b", 480, 832, 81, text_encoder_storage="fp8_scaled")
    assert base.weights() == work("wan2.2-t2v-a14b", 480, 832, 81, text_encoder_storage="bf16").weights()
    assert base.weights()["text_encoder"] == 2 * p
    assert fp8.weights()["text_encoder"] == 2 * emb + (p - emb) == pytest.approx(6.73 * GB, rel=0.01)
    assert fp8.weights()["text_encoder"] == work("wan2.2-t2v-a14b", 480, 832, 81,
                                                 text_encoder_storage="fp8_e4m3fn").weights()["text_encoder"]
    upcast = 10_240 * 4096 * 2  # one FFN weight upcast to bf16 while it runs
    for mode in MODES:
        a, b = base.estimate(mode), fp8.estimate(mode)
        assert a.ram_bytes - b.ram_bytes == p - emb, mode
        if mode == "sequential":  # one leaf at a time: its fp8 bytes plus its bf16 upcast outweigh a bf16 leaf
            assert b.phases["text_encode"] - a.phases["text_encode"] == 10_240 * 4096, mode
        else:
            assert b.phases["text_encode"] < a.phases["text_encode"], mode
        # mode none keeps the encoder resident in every phase; the offload modes only in its own
        kept = (p - emb) if mode == "none" else 0
        assert {k: v - kept for k, v in a.phases.items() if k != "text_encode"} == \
            {k: v for k, v in b.phases.items() if k != "text_encode"}, mode
    assert base.estimate("model").phases["text_encode"] - fp8.estimate("model").phases["text_encode"] == p - emb - upcast
    # the encoder on the CPU costs no VRAM either way; on a CPU-only machine the embedding is fp32
    assert base.estimate("model", text_encoder_on_cpu=True).phases == fp8.estimate("model", text_encoder_on_cpu=True).phases
    assert fp8.estimate(device="cpu").weights["text_encoder"] == 4 * emb + (p - emb)
    # demo encoders get UMT5-XXL's proportions, so their fp8 estimate is cheaper too
    demo = get_spec("demo-wan2.2-t2v-a14b")
    assert Workload(demo, 64, 64, 9, text_encoder_storage="fp8_scaled").weights()["text_encoder"] < \
        Workload(demo, 64, 64, 9).weights()["text_encoder"]
