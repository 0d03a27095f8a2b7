"""The Tools tab's inspection text names the model, its storage, and what happens on GGUF."""
from __future__ import annotations

from ui.tools_tab import inspection_markdown

COV = {"applied": 40, "total": 40, "unmatched": [], "shape_mismatch": []}


def _info(storage: str) -> dict:
    return {"format": "diffusers/PEFT", "rank": 4, "compatible": True,
            "model": {"id": "wan-q8", "label": "Wan2.2 T2V A14B", "storage": storage},
            "coverage_by_expert": {"high_noise": COV, "low_noise": COV}}


def test_gguf_says_runtime_and_no_bake():
    text = inspection_markdown(_info("gguf-Q8_0"))
    assert "(wan-q8, gguf-Q8_0;" in text and "applies this LoRA at run time" in text
    assert "- **low-noise expert**: 40/40 keys match" in text


def test_other_storages_say_nothing_of_runtime():
    text = inspection_markdown(_info("fp8_scaled"))
    assert "(wan-q8, fp8_scaled;" in text and "run time" not in text


def test_merge_plan_says_what_a_merge_makes_of_each_source():
    from types import SimpleNamespace

    from engine.port import ModelView
    from ui.tools_tab import merge_plan_markdown

    views = [ModelView("folder", "demo-wan2.1-t2v-1.3b", True),
             ModelView("fp8", "demo-wan2.1-t2v-1.3b", True, source="comfyui", storage="fp8_scaled"),
             ModelView("q8", "demo-wan2.1-t2v-1.3b", True, source="comfyui", storage="gguf-Q8_0")]
    ctx = SimpleNamespace(models=lambda refresh=False: views)
    rows = [{"file": "a.safetensors", "weight": 0.5}]
    assert merge_plan_markdown(ctx, "folder", rows).startswith("Will merge into a copy of **folder**")
    assert merge_plan_markdown(ctx, "fp8", rows).startswith("Will merge into a new recipe")
    gguf = merge_plan_markdown(ctx, "q8", rows)
    assert gguf.startswith("⚠ **q8** is GGUF (gguf-Q8_0)") and "`a.safetensors` × 0.5" in gguf
