"""ComfyUI's newer mixed-precision fp8 layout (`weight_scale`, `input_scale`, a `comfy_quant` JSON blob per layer)
loads exactly like its scaled-fp8 twin, takes LoRAs the same way (baked files keep the layout), and layouts WanStack
cannot read (int8 with per-row scales) are refused with the reason instead of loading silently wrong weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quant_env(demo_model, demo_loras_dir, tmp_path_factory):
    from engine.facade import Engine, Settings
    from engine.models.testdata import build_comfyui_tree

    root = tmp_path_factory.mktemp("comfy-quant") / "models"
    build_comfyui_tree(demo_model("wan2.2-t2v-a14b"), root, storages=("fp8_scaled", "fp8_comfy_quant", "int8"),
                       loras_from=demo_loras_dir)
    models = tmp_path_factory.mktemp("models-quant")
    engine = Engine(Settings(models_dir=models, comfyui_dir=root, allow_lora_paths_outside=True))
    return engine, models, root


def test_listing_reads_the_layout_and_refuses_int8(quant_env):
    engine, _, _ = quant_env
    models = {m.id: m for m in engine.model_infos(refresh=True)}
    cq = models["wan2.2_t2v_14B_fp8_comfy_quant"]
    assert cq.ok and cq.storage == "fp8_scaled" and cq.storage_label == "fp8 scaled · 2 experts"
    bad = [m for m in models.values() if "int8" in m.id]
    assert bad and all(not m.ok and "int8" in m.reason and "use one of those versions" in m.reason for m in bad)


def test_comfy_quant_loads_like_scaled_fp8_and_bakes_in_its_own_layout(quant_env, loaded_experts, expert_state,
                                                                       tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from engine.lora.bake import merge_model
    from engine.models.headers import read_header
    from engine.types import LoraEntry, Stack

    engine, models, root = quant_env
    listed = {m.id: m for m in engine.model_infos(refresh=True)}
    scaled, _, _ = loaded_experts(engine, listed["wan2.2_t2v_14B_fp8_scaled"])
    cq_experts, spec, session = loaded_experts(engine, listed["wan2.2_t2v_14B_fp8_comfy_quant"])
    # the scale was read: a loader ignoring `weight_scale` differs here
    expert_state.assert_same(expert_state.of(cq_experts), expert_state.of(scaled))
    assert any(v != 1.0 for k, v in expert_state.of(cq_experts).items() if k[-1].endswith(".scale"))

    lora = root / "loras" / "demo" / "anime-a14b-peft.safetensors"
    big = tmp_path / "big.safetensors"
    save_file({k: v * 60 for k, v in load_file(lora).items()}, str(big))
    stack = Stack((LoraEntry(str(lora), 0.8, "both"), LoraEntry(str(big), 1.0, "low_noise")))
    out = models / "cq-baked.json"
    merge_model(listed["wan2.2_t2v_14B_fp8_comfy_quant"], stack, out, resolve=Path)
    session.apply(spec, stack, resolve=Path)
    baked, _, _ = loaded_experts(engine, {m.id: m for m in engine.model_infos(refresh=True)}["cq-baked"])
    expert_state.assert_same(expert_state.of(baked), expert_state.of(cq_experts))
    header = read_header(out.with_name("cq-baked_low_noise.safetensors"))
    assert not any(k.endswith(".scale_weight") for k in header.tensors)  # the file keeps its own layout
    assert sum(k.endswith(".comfy_quant") for k in header.tensors) == sum(k.endswith(".weight_scale")
                                                                          for k in header.tensors) > 0
    assert json.loads(header.metadata["wanstack_merge"])["model_type"] == spec.type
    del torch


def test_a_recipe_naming_an_int8_file_says_why(quant_env, tmp_path):
    from engine.models.recipes import recipe_info

    _, _, root = quant_env
    dm = root / "diffusion_models"
    recipe = tmp_path / "int8.json"
    recipe.write_text(json.dumps({"schema": 1,
                                  "transformer": str(dm / "wan2.2_t2v_high_noise_14B_int8.safetensors"),
                                  "transformer_2": str(dm / "wan2.2_t2v_low_noise_14B_int8.safetensors")}))
    info = recipe_info(recipe, models_dir=tmp_path, comfyui_dir=root)
    assert not info.ok and "stores" in info.reason and "I8" in info.reason
