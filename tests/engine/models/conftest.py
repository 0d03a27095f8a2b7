"""A ComfyUI-style tree of tiny files in the real layouts, written once per session from the demo A14B."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

STORAGES = ("fp32", "bf16", "fp8_scaled", "fp8_e4m3fn")
GGUF_TYPES = ("Q8_0", "Q4_0", "Q5_1")


@pytest.fixture(scope="session")
def comfy_tree(demo_model, demo_loras_dir, tmp_path_factory) -> Path:
    """models/ of a ComfyUI install: diffusion_models/ (4 storages, bare names), unet/ (GGUF), text_encoders/
    (+ tokenizer/), vae/, loras/."""
    from engine.models.testdata import build_comfyui_tree

    demo = demo_model("wan2.2-t2v-a14b")
    return build_comfyui_tree(demo, tmp_path_factory.mktemp("comfy") / "models", storages=STORAGES,
                              gguf_types=GGUF_TYPES, loras_from=demo_loras_dir)


@pytest.fixture
def tree_copy(comfy_tree, tmp_path) -> Path:
    """A private copy of the tree (hard links) that a test may break."""
    out = tmp_path / "models"
    shutil.copytree(comfy_tree, out, copy_function=lambda s, d: __import__("os").link(s, d))
    return out


def _loaded_experts(engine, info):
    """The experts of a loaded pipeline and the generator's merge session on them (the path generate takes)."""
    from engine.run.generate import Generator

    gen = Generator(engine.settings, engine.library)
    spec = engine.spec(info.type)
    pipe = gen.load(info, spec)
    return gen.experts(pipe, spec), spec, gen.merge_session(pipe, spec)


@pytest.fixture
def loaded_experts():
    """`loaded_experts(engine, info)` -> (expert modules, spec, merge session) of a model as generate loads it."""
    return _loaded_experts


class ExpertState:
    """Byte snapshots of loaded experts (every parameter's bytes, every fp8 layer's scale), and their comparison."""

    @staticmethod
    def of(experts) -> dict:
        import torch

        out = {}
        for e, m in experts.items():
            for n, p in m.named_parameters():
                out[(e, n)] = p.detach().reshape(-1).view(torch.uint8).clone()
            for n, mod in m.named_modules():
                if hasattr(mod, "weight_scale"):
                    out[(e, n + ".scale")] = float(mod.weight_scale)
        return out

    @staticmethod
    def assert_same(a: dict, b: dict) -> None:
        import torch

        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]) if isinstance(a[k], float) else torch.equal(a[k], b[k]), k


@pytest.fixture
def expert_state():
    """`expert_state.of(experts)` and `expert_state.assert_same(a, b)`."""
    return ExpertState
