"""An fp8 umt5 text encoder single file stays fp8 in memory: Linear weights float8_e4m3fn with their scales,
upcast per call, encoding like the same weights dequantized at load, and priced that way by the estimate.

Tolerances against the dequantized-at-load reference (max |difference| / max |reference| of last_hidden_state):
fp32 is exact (the same arithmetic); in bf16/fp16 Fp8Linear multiplies by the scale in the compute dtype where
the load-time dequantization multiplies in fp32, measured on the demo encoder at 0.0096 (bf16) and 0.0016 (fp16)
for fp8_scaled, the size of bf16's own rounding (the dequantized encoder at bf16 is 0.0096 from itself at fp32).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

TOLERANCE = {"float32": 0.0, "bfloat16": 0.02, "float16": 0.005}
IDS = [[5, 17, 99, 3, 250, 42, 7, 1]]


@pytest.fixture(scope="module")
def te_files(demo_model, tmp_path_factory) -> dict[str, Path]:
    """The demo A14B's umt5 as ComfyUI files (fp32, fp8_scaled, plain fp8), each fp8 file also dequantized into
    an fp32 file of the same names (the weights the old load-time dequantization gave), and the folder."""
    import torch
    from safetensors.torch import save_file
    from transformers import UMT5EncoderModel

    from engine.lora.merge import WeightSource
    from engine.models.headers import read_header
    from engine.models.keys import is_aux
    from engine.models.testdata import write_text_encoder

    demo = demo_model("wan2.2-t2v-a14b")
    out = tmp_path_factory.mktemp("te-fp8")
    ref = UMT5EncoderModel.from_pretrained(demo, subfolder="text_encoder", dtype=torch.float32)
    files = {"folder": demo / "text_encoder"}
    for storage in ("fp32", "fp8_scaled", "fp8_e4m3fn"):
        files[storage] = write_text_encoder(ref, out / f"umt5_xxl_{storage}.safetensors", storage)
    for storage in ("fp8_scaled", "fp8_e4m3fn"):
        header = read_header(files[storage])
        names = [n for n in header.tensors if not is_aux(n)]
        source = WeightSource(files[storage], {n: n for n in names})
        path = out / f"umt5_xxl_{storage}_dequantized.safetensors"
        save_file({n: source.read(n, torch.float32) for n in names}, str(path), metadata=header.metadata)
        files[f"{storage}-dequantized"] = path
    return files


def _encode(te):
    import torch

    from engine.models.load import own_aligned

    own_aligned(te)  # both sides laid out alike: CPU kernels pick paths by alignment
    with torch.no_grad():
        return te(torch.tensor(IDS)).last_hidden_state


def _rel(got, want) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def _linears(te) -> dict:
    import torch

    return {n: m for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("storage", ["fp8_scaled", "fp8_e4m3fn"])
def test_fp8_linears_stay_fp8_with_their_scales(te_files, storage):
    import torch
    from safetensors import safe_open

    from engine.models.fp8 import fp8_linear_class
    from engine.models.load import load_text_encoder

    te = load_text_encoder(str(te_files[storage]), torch.bfloat16)
    linears = _linears(te)
    assert len(linears) == 2 * 7  # q, k, v, o, wi_0, wi_1, wo in each of the demo's 2 blocks
    with safe_open(str(te_files[storage]), "pt") as f:
        keys = set(f.keys())
        for name, m in linears.items():
            assert type(m) is fp8_linear_class() and m.weight.dtype == torch.float8_e4m3fn, name
            # the file's own bytes, not a requantization
            assert torch.equal(m.weight.view(torch.uint8), f.get_tensor(f"{name}.weight").view(torch.uint8)), name
            scale_key = f"{name}.scale_weight"
            want = float(f.get_tensor(scale_key)) if scale_key in keys else 1.0
            assert m.weight_scale.dtype == torch.float32 and float(m.weight_scale) == want, name
            assert m.fp8_scaled == (storage == "fp8_scaled")
    # the embedding, norms and position tables are in the compute dtype, so is the model's dtype, which the
    # pipeline casts the prompt embeddings to
    others = {n: p.dtype for n, p in te.named_parameters() if not n.endswith(tuple(f"{k}.weight" for k in linears))}
    assert "shared.weight" in others and set(others.values()) == {torch.bfloat16}
    assert te.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("storage", ["fp8_scaled", "fp8_e4m3fn"])
def test_fp8_encoding_equals_the_weights_dequantized_at_load(te_files, storage, dtype):
    """The reference runs transformers' own feed-forward (plain Linear `wo`); ours keeps `wo` fp8 without
    letting transformers cast the activations to fp8."""
    import torch

    from engine.models.load import load_text_encoder

    dt = getattr(torch, dtype)
    fp8 = load_text_encoder(str(te_files[storage]), dt)
    ref = load_text_encoder(str(te_files[f"{storage}-dequantized"]), dt)
    assert not any(m.weight.dtype == torch.float8_e4m3fn for m in _linears(ref).values())
    got, want = _encode(fp8), _encode(ref)
    assert got.dtype == want.dtype == dt and torch.isfinite(got).all()
    if TOLERANCE[dtype] == 0:
        assert torch.equal(got, want)
    else:
        assert _rel(got, want) <= TOLERANCE[dtype], _rel(got, want)
        # and the upcast per call adds no error beyond the compute dtype's own: against the fp32 encoding, the
        # fp8 encoder is about as close as the dequantized one (measured: ratio 0.99 bf16, 0.86 fp16)
        exact = _encode(load_text_encoder(str(te_files[f"{storage}-dequantized"]), torch.float32))
        assert _rel(got, exact) <= 1.5 * _rel(want, exact), (_rel(got, exact), _rel(want, exact))
    # fp16: `wo` computes in fp32 as transformers' _keep_in_fp32_modules has it, fp8 or not
    ff = fp8.encoder.block[0].layer[1].DenseReluDense
    assert ff.wo_dtype == (torch.float32 if dt == torch.float16 else dt)
    assert ff.wo.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_single_file_loads_like_the_folder(te_files, dtype):
    """transformers keeps umt5's `wo` in fp32 at fp16 only (_keep_in_fp32_modules); a single file does too."""
    import torch
    from transformers import UMT5EncoderModel

    from engine.models.load import load_text_encoder

    dt = getattr(torch, dtype)
    folder = UMT5EncoderModel.from_pretrained(te_files["folder"], dtype=dt).eval()
    single = load_text_encoder(str(te_files["fp32"]), dt)
    dtypes = {n: p.dtype for n, p in folder.named_parameters()}
    assert {n: p.dtype for n, p in single.named_parameters()} == dtypes
    assert dtypes["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == (torch.float32 if dt == torch.float16 else dt)
    assert single.encoder.embed_tokens.weight is single.shared.weight  # one embedding, as the folder's
    assert torch.equal(_encode(single), _encode(folder))


def test_fp8_text_encoder_bytes(te_files):
    """Measured from the modules at bf16: the Linear weights take half the bytes; the rest is unchanged."""
    import torch

    from engine.models.load import load_text_encoder

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    fp8 = load_text_encoder(str(te_files["fp8_scaled"]), torch.bfloat16)
    ref = load_text_encoder(str(te_files["fp8_scaled-dequantized"]), torch.bfloat16)
    lin8 = nbytes(m.weight for m in _linears(fp8).values())
    lin16 = nbytes(m.weight for m in _linears(ref).values())
    assert lin8 > 0 and 2 * lin8 == lin16
    all8, all16 = nbytes(fp8.parameters()), nbytes(ref.parameters())
    assert all16 - all8 == lin16 - lin8
    # one 0-d fp32 scale per Linear, as buffers
    assert nbytes(fp8.buffers()) - nbytes(ref.buffers()) == 4 * len(_linears(fp8))


def test_fp8_weights_and_scales_travel_with_the_module(te_files):
    """`.to(device)` (what model offload and group offload's onload do) keeps the fp8 dtype and the scale."""
    import torch

    from engine.models.load import load_text_encoder

    te = load_text_encoder(str(te_files["fp8_scaled"]), torch.bfloat16)
    before = {n: float(m.weight_scale) for n, m in _linears(te).items()}
    moved = copy.deepcopy(te).to("meta")
    for name, m in _linears(moved).items():
        assert m.weight.device.type == "meta" and m.weight.dtype == torch.float8_e4m3fn, name
        assert m.weight_scale.device.type == "meta" and m.weight_scale.dtype == torch.float32, name
    te.to("cpu")
    assert {n: float(m.weight_scale) for n, m in _linears(te).items()} == before


def test_real_umt5_xxl_bytes_and_the_estimate():
    """The real umt5-xxl's geometry (on the meta device, nothing allocated): the Linear part and the rest,
    against what the estimator prices for a bf16 and an fp8 text encoder."""
    import torch

    from engine.models.catalog import CATALOG
    from engine.memory.estimate import Workload
    from engine.models.load import empty_text_encoder, shipped_config

    te = empty_text_encoder(shipped_config("umt5-xxl"))  # as load_text_encoder builds it
    linear = sum(m.weight.numel() for m in te.modules() if isinstance(m, torch.nn.Linear))
    rest = sum(p.numel() for p in te.parameters()) - linear
    assert rest == te.shared.weight.numel() + 24 * 32 * 64 + 49 * 4096  # embedding, position tables, norms
    bf16_bytes, fp8_bytes = 2 * (linear + rest), linear + 2 * rest
    spec = CATALOG["wan2.2-t2v-a14b"]
    est = {s: Workload(spec, 480, 832, 81, text_encoder_storage=s).weights()["text_encoder"]
           for s in (None, "bf16", "fp8_scaled", "fp8_e4m3fn")}
    assert est[None] == est["bf16"] and est["fp8_scaled"] == est["fp8_e4m3fn"]
    assert abs(est["bf16"] - bf16_bytes) / bf16_bytes < 0.002
    assert abs(est["fp8_scaled"] - fp8_bytes) / fp8_bytes < 0.002
    assert fp8_bytes / bf16_bytes < 0.6


@pytest.mark.parametrize("mode", ["model", "group", "sequential"])
def test_offload_modes_keep_the_fp8_text_encoder(te_files, comfy_tree, mode):
    """diffusers' offload hooks around the fp8 encoder (on the CPU: the hook paths, not a device copy) encode
    like mode none, and undoing them leaves the weights fp8 with their scales."""
    import torch

    from engine.memory.offload import apply_plan, undo_plan
    from engine.memory.policy import OffloadPlan
    from engine.models.load import build_pipeline

    info = _fp8_te_info(te_files, comfy_tree)
    pipe = build_pipeline(info, torch.float32).pipe

    def encode():
        with torch.no_grad():
            return pipe.encode_prompt("a fox in the snow", do_classifier_free_guidance=False,
                                      device=torch.device("cpu"))[0]

    apply_plan(pipe, OffloadPlan(mode="none"), "cpu")
    want = encode()
    scales = {n: float(m.weight_scale) for n, m in _linears(pipe.text_encoder).items()}
    apply_plan(pipe, OffloadPlan(mode=mode), "cpu")
    assert torch.equal(encode(), want)
    undo_plan(pipe)
    linears = _linears(pipe.text_encoder)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in linears.values())
    assert {n: float(m.weight_scale) for n, m in linears.items()} == scales


def _fp8_te_info(te_files, comfy_tree):
    from engine.models.detect import ModelInfo

    dm = comfy_tree / "diffusion_models"
    files = {"transformer": str(dm / "wan2.2_t2v_high_noise_14B_fp32.safetensors"),
             "transformer_2": str(dm / "wan2.2_t2v_low_noise_14B_fp32.safetensors"),
             "text_encoder": str(te_files["fp8_scaled"]), "vae": str(comfy_tree / "vae" / "wan_2.1_vae.safetensors"),
             "tokenizer": str(comfy_tree / "text_encoders" / "tokenizer")}
    return ModelInfo("fp8-te", files["transformer"], "demo-wan2.2-t2v-a14b", True, source="recipe",
                     storage="fp32", files=files)


@pytest.mark.slow
def test_generate_from_a_recipe_with_an_fp8_text_encoder(te_files, comfy_tree, tmp_path):
    """A whole run from a recipe whose text encoder is the fp8_scaled file: it stays fp8 in the loaded pipeline,
    and the run's memory plan prices it as fp8 (the CPU plan: weights in fp32, fp8 Linear weights 1 byte)."""
    import json

    import imageio.v3 as iio
    import torch

    from engine.models.catalog import CATALOG
    from engine.facade import Engine, Settings
    from engine.memory.estimate import Workload
    from engine.types import GenerationRequest

    models = tmp_path / "models"
    models.mkdir()
    files = _fp8_te_info(te_files, comfy_tree).files
    (models / "fp8-te.json").write_text(json.dumps({"schema": 1, **files}))
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data", outputs_dir=tmp_path / "outputs"))
    out = tmp_path / "fp8-te.mp4"
    result = engine.generate(GenerationRequest(model="fp8-te", prompt="a fox in the snow", steps=2, seed=1),
                             out_path=out)
    assert result.frames == 9 and iio.imread(out).shape[0] == 9
    te = engine._generator._pipe.text_encoder
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in _linears(te).values())
    spec = CATALOG["demo-wan2.2-t2v-a14b"]
    priced = {s: Workload(spec, 64, 64, 9, dtype="fp32", text_encoder_storage=s).weights("fp32")["text_encoder"]
              for s in ("fp8_scaled", None)}
    assert priced["fp8_scaled"] < priced[None]
    assert result.plan["estimate_bytes"]["text_encoder"] == priced["fp8_scaled"]
