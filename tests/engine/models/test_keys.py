"""Name maps between single files and diffusers, checked against diffusers' own converters and the official layouts."""
from __future__ import annotations

import pytest


def _vae_keys(**cfg):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    with init_empty_weights():
        vae = AutoencoderKLWan(**cfg)
    return [n for n, _ in vae.named_parameters()], dict(vae.config)


def test_vae_map_matches_diffusers_converter_on_the_released_21_layout():
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from engine.models.keys import vae_name_map
    from engine.models.load import shipped_config

    cfg = {k: v for k, v in shipped_config("vae-wan2.1").items() if not k.startswith("_")}
    keys, config = _vae_keys(**cfg)
    ours = vae_name_map(keys, config)
    theirs = {new: old for new, old in convert_wan_vae_to_diffusers({o: o for o in ours.values()}).items()}
    assert ours == theirs and len(ours) == 194


def test_vae_map_22_nests_blocks_like_the_official_vae2_2():
    from engine.models.keys import vae_name_map
    from engine.models.load import shipped_config

    cfg = {k: v for k, v in shipped_config("vae-wan2.2").items() if not k.startswith("_")}
    keys, config = _vae_keys(**cfg)
    names = vae_name_map(keys, config)
    assert len(set(names.values())) == len(keys)
    # official wan/modules/vae2_2.py: Down_ResidualBlock.downsamples = [ResidualBlock x 2, Resample]
    assert names["encoder.down_blocks.1.downsampler.time_conv.weight"] == "encoder.downsamples.1.downsamples.2.time_conv.weight"
    assert names["encoder.down_blocks.0.resnets.1.conv2.weight"] == "encoder.downsamples.0.downsamples.1.residual.6.weight"
    # Up_ResidualBlock.upsamples = [ResidualBlock x 3, Resample]
    assert names["decoder.up_blocks.0.upsampler.resample.1.weight"] == "decoder.upsamples.0.upsamples.3.resample.1.weight"
    assert names["decoder.up_blocks.2.resnets.0.conv_shortcut.bias"] == "decoder.upsamples.2.upsamples.0.shortcut.bias"


def test_vae_map_follows_other_block_counts():
    from engine.models.keys import vae_name_map

    keys, config = _vae_keys(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    names = vae_name_map(keys, config)
    assert len(set(names.values())) == len(keys)
    # 2.1 decoder, flat: level 0 = 2 residual blocks + resample -> indices 0,1,2; level 1 starts at 3
    assert names["decoder.up_blocks.1.resnets.0.conv1.weight"] == "decoder.upsamples.3.residual.2.weight"
    assert names["decoder.up_blocks.0.upsamplers.0.time_conv.weight"] == "decoder.upsamples.2.time_conv.weight"


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_transformer_names_round_trip_through_diffusers_converter(prefix):
    from engine.models.demo import _transformer
    from engine.models.keys import transformer_name_map
    from engine.models.testdata import to_wan_names

    module = _transformer("wan2.1-i2v-14b", 32, 32)  # the I2V image branch has the most renames
    wan = to_wan_names([n for n, _ in module.named_parameters()])  # raises if it does not invert the converter
    assert wan["blocks.0.attn2.add_k_proj.weight"] == "blocks.0.cross_attn.k_img.weight"
    assert wan["blocks.0.norm2.weight"] == "blocks.0.norm3.weight"  # diffusers' cross-attn norm is Wan's norm3
    assert wan["condition_embedder.time_proj.weight"] == "time_projection.1.weight"
    back = transformer_name_map([prefix + v for v in wan.values()] + [prefix + "scaled_fp8"])
    assert back == {k: prefix + v for k, v in wan.items()}


def test_t5_map_reads_the_original_wan_layout_and_ties_the_embedding():
    from engine.models.keys import t5_name_map

    names = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.pos_embedding.embedding.weight",
             "blocks.0.ffn.gate.0.weight", "blocks.0.ffn.fc1.weight", "blocks.0.ffn.fc2.weight", "norm.weight",
             "blocks.0.norm1.weight", "blocks.0.norm2.weight"]
    m = t5_name_map(names)
    assert m["shared.weight"] == m["encoder.embed_tokens.weight"] == "token_embedding.weight"
    assert m["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == "blocks.0.pos_embedding.embedding.weight"
    assert m["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"] == "blocks.0.ffn.gate.0.weight"
    assert m["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == "blocks.0.ffn.fc2.weight"
    assert m["encoder.final_layer_norm.weight"] == "norm.weight"
