"""Generation from single files against the diffusers folder of the same weights.

fp32 and bf16 single files give the folder's latents exactly (torch.equal). fp8 and GGUF are lossy storages;
their latents stay within a stated tolerance of the folder's (max abs difference over the latents' max abs).
"""
from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.slow

# Relative tolerance: max|latents - folder latents| / max|folder latents| after 3 steps on the demo A14B.
# Measured (CPU, this seed): fp8_scaled 0.012, fp8_e4m3fn 0.012, Q8_0 0.001, Q5_1 0.0036, Q4_0 0.011.
TOLERANCE = {"fp8_scaled": 0.03, "fp8_e4m3fn": 0.03, "gguf-Q8_0": 0.005, "gguf-Q5_1": 0.01, "gguf-Q4_0": 0.03}


def _latents(engine, info):
    import torch

    from engine.run.generate import Generator

    gen = Generator(engine.settings, engine.library)
    pipe = gen.load(info, engine.spec(info.type))
    out = pipe(prompt="a fox in the snow", height=64, width=64, num_frames=9, num_inference_steps=3,
               guidance_scale=4.0, guidance_scale_2=3.0, generator=torch.Generator("cpu").manual_seed(3),
               output_type="latent").frames
    return out, pipe


@pytest.fixture(scope="module")
def engine_and_models(comfy_tree, demo_model, tmp_path_factory):
    """An engine listing the demo folder, a bf16 copy of it, and the ComfyUI tree."""
    import torch
    from diffusers import WanTransformer3DModel

    from engine.facade import Engine, Settings

    models = tmp_path_factory.mktemp("models")
    demo = demo_model("wan2.2-t2v-a14b")
    shutil.copytree(demo, models / "demo-fp32")
    bf16 = models / "demo-bf16"
    shutil.copytree(demo, bf16)
    for comp in ("transformer", "transformer_2"):
        t = WanTransformer3DModel.from_pretrained(demo, subfolder=comp, torch_dtype=torch.float32).to(torch.bfloat16)
        shutil.rmtree(bf16 / comp)
        t.save_pretrained(bf16 / comp, max_shard_size="64KB")
    engine = Engine(Settings(models_dir=models, comfyui_dir=comfy_tree, allow_lora_paths_outside=True))
    return engine, {m.id: m for m in engine.model_infos()}


@pytest.mark.parametrize("folder, single", [("demo-fp32", "wan2.2_t2v_14B_fp32"), ("demo-bf16", "wan2.2_t2v_14B_bf16")])
def test_single_file_equals_the_folder(engine_and_models, folder, single):
    import torch

    engine, models = engine_and_models
    ref, _ = _latents(engine, models[folder])
    got, pipe = _latents(engine, models[single])
    assert torch.equal(ref, got)
    # every component came from a single file: transformers, the T5-layout umt5, the original-layout VAE
    assert models[single].files["vae"].endswith("wan_2.1_vae.safetensors")
    assert pipe.transformer.config.num_layers == 2


@pytest.mark.parametrize("single, storage", [
    ("wan2.2_t2v_14B_fp8_scaled", "fp8_scaled"), ("wan2.2_t2v_14B_fp8_e4m3fn", "fp8_e4m3fn"),
    ("wan2.2_t2v-14B-Q8_0", "gguf-Q8_0"), ("wan2.2_t2v-14B-Q5_1", "gguf-Q5_1"), ("wan2.2_t2v-14B-Q4_0", "gguf-Q4_0"),
])
def test_lossy_storages_stay_within_tolerance_and_stay_quantized(engine_and_models, single, storage):
    import torch

    engine, models = engine_and_models
    ref, _ = _latents(engine, models["demo-fp32"])
    got, pipe = _latents(engine, models[single])
    rel = float((ref - got).abs().max() / ref.abs().max())
    assert 0 < rel <= TOLERANCE[storage], rel
    q = pipe.transformer.blocks[0].ffn.net[0].proj.weight
    if storage.startswith("fp8"):
        assert q.dtype == torch.float8_e4m3fn
        assert pipe.transformer_2.blocks[1].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    else:
        assert type(q).__name__ == "GGUFParameter" and q.quant_type.name == storage[5:]


def test_scaled_fp8_without_its_scales_would_be_wrong(comfy_tree):
    """The scale is applied: the dequantized weight equals fp8 * scale_weight, not the raw fp8 values."""
    import torch
    from safetensors import safe_open

    from engine.models.catalog import CATALOG
    from engine.models.load import load_transformer

    path = comfy_tree / "diffusion_models" / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
    module, source, storage = load_transformer(str(path), CATALOG["demo-wan2.2-t2v-a14b"], torch.float32)
    layer = module.blocks[0].attn1.to_q
    with safe_open(str(path), "pt") as f:
        raw = f.get_tensor("blocks.0.self_attn.q.weight")
        scale = f.get_tensor("blocks.0.self_attn.q.scale_weight")
    assert storage == "fp8_scaled" and float(scale) != 1.0
    x = torch.randn(3, raw.shape[1])
    want = x @ (raw.float() * scale).T + layer.bias
    assert torch.allclose(layer(x), want, atol=1e-6)
    assert not torch.allclose(layer(x), x @ raw.float().T + layer.bias, atol=1e-3)


def test_wan2gp_text_encoder_layout_and_tokenizer_in_its_folder(demo_model, tmp_path):
    """Wan2GP keeps umt5 in the original Wan names (token_embedding, blocks.N.attn.q, ...) with the tokenizer
    files in the same folder: found without a hub, and it encodes exactly like the diffusers folder's encoder."""
    import torch
    from transformers import AutoTokenizer, UMT5EncoderModel

    from engine.models.load import load_text_encoder, load_tokenizer
    from engine.models.recipes import find_tokenizer
    from engine.models.testdata import write_text_encoder

    demo = demo_model("wan2.2-t2v-a14b")
    ref = UMT5EncoderModel.from_pretrained(demo, subfolder="text_encoder", torch_dtype=torch.float32).eval()
    folder = tmp_path / "umt5-xxl"
    path = write_text_encoder(ref, folder / "models_t5_umt5-xxl-enc-bf16.safetensors", "fp32", layout="wan")
    shutil.copytree(demo / "tokenizer", folder, dirs_exist_ok=True)
    tok_path = find_tokenizer(str(path), [], demo=True)
    assert tok_path == str(folder)
    te = load_text_encoder(str(path), torch.float32)
    tok = load_tokenizer(tok_path, te)
    ids = tok(["a fox in the snow"], return_tensors="pt").input_ids
    assert torch.equal(ids, AutoTokenizer.from_pretrained(demo / "tokenizer")(["a fox in the snow"], return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(te(ids).last_hidden_state, ref(ids).last_hidden_state)


def test_wan21_i2v_from_single_files_with_clip_vision_equals_the_folder(demo_model, tmp_path):
    """The I2V image branch (img_emb, k_img/v_img) and ComfyUI's clip_vision_h layout, end to end."""
    import torch
    from PIL import Image

    from engine.facade import Engine, Settings
    from engine.run.generate import Generator
    from engine.models.testdata import build_comfyui_tree

    demo = demo_model("wan2.1-i2v-14b")
    tree = build_comfyui_tree(demo, tmp_path / "comfy", storages=("fp32",))
    models = tmp_path / "models"
    models.mkdir()
    (models / "demo").symlink_to(demo)
    engine = Engine(Settings(models_dir=models, comfyui_dir=tree))
    infos = {m.id: m for m in engine.model_infos()}
    single = infos["wan2.1_i2v_480p_14B_fp32"]
    assert single.ok and single.files["image_encoder"].endswith("clip_vision/clip_vision_h.safetensors")
    image = Image.new("RGB", (64, 64), (200, 40, 40))

    def latents(info):
        pipe = Generator(engine.settings, engine.library).load(info, engine.spec(info.type))
        return pipe(image=image, prompt="a cat", height=64, width=64, num_frames=9, num_inference_steps=2,
                    guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(1), output_type="latent").frames

    assert torch.equal(latents(infos["demo"]), latents(single))


def test_bf16_compute_keeps_the_same_fp32_modules_as_from_pretrained(comfy_tree, demo_model):
    """On a GPU experts load in bf16; a single file must keep diffusers' _keep_in_fp32_modules in fp32 too."""
    import torch
    from diffusers import WanTransformer3DModel

    from engine.models.catalog import CATALOG
    from engine.models.load import load_transformer

    folder = WanTransformer3DModel.from_pretrained(demo_model("wan2.2-t2v-a14b"), subfolder="transformer",
                                                   torch_dtype=torch.bfloat16)
    single, _, _ = load_transformer(str(comfy_tree / "diffusion_models" / "wan2.2_t2v_high_noise_14B_fp32.safetensors"),
                                    CATALOG["demo-wan2.2-t2v-a14b"], torch.bfloat16)
    ref = dict(folder.named_parameters())
    got = dict(single.named_parameters())
    assert set(ref) == set(got)
    assert {n for n, p in ref.items() if p.dtype == torch.float32} == {n for n, p in got.items() if p.dtype == torch.float32} != set()
    assert all(torch.equal(ref[n], got[n]) for n in ref)
