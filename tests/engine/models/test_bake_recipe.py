"""`lora merge` and `lora inspect` on single-file models (recipes, --comfyui): a baked recipe equals the
model the generator merges in memory, byte for byte (fp32 and fp8, scales included); GGUF is refused with
the way out; a failed bake leaves nothing behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def env(comfy_tree, tmp_path_factory):
    from engine.facade import Engine, Settings

    models = tmp_path_factory.mktemp("models-bake")
    engine = Engine(Settings(models_dir=models, comfyui_dir=comfy_tree, allow_lora_paths_outside=True))
    return engine, models, comfy_tree / "loras" / "demo"


def _stack(*entries):
    from engine.types import LoraEntry, Stack

    return Stack(tuple(LoraEntry(file=str(f), weight=w, applies_to=a) for f, w, a in entries))


def _big_lora(src: Path, out: Path, factor: float) -> Path:
    """The same LoRA with every tensor times `factor`: its merge outgrows fp8's range at the file's scale."""
    from safetensors.torch import load_file, save_file

    save_file({k: v * factor for k, v in load_file(src).items()}, out)
    return out


@pytest.mark.parametrize("storage", ["fp32", "fp8_scaled", "fp8_e4m3fn"])
def test_baked_recipe_equals_the_in_memory_merge(env, storage, tmp_path, loaded_experts, expert_state):
    from engine.lora.bake import merge_model

    engine, models, loras = env
    info = {m.id: m for m in engine.model_infos(refresh=True)}[f"wan2.2_t2v_14B_{storage}"]
    big = _big_lora(loras / "anime-a14b-peft.safetensors", tmp_path / "big.safetensors", 60.0)
    stack = _stack((loras / "anime-a14b-peft.safetensors", 0.8, "both"), (big, 1.0, "low_noise"),
                   (loras / "speed_high_noise.safetensors", 1.0, "high_noise"))
    out = models / f"baked-{storage}.json"
    report = merge_model(info, stack, out, resolve=Path)
    assert [r["status"] for r in report["loras"]] == ["applied"] * 3
    assert set(report["changed_tensors"]) == {"transformer", "transformer_2"}
    recipe = json.loads(out.read_text())
    assert recipe["transformer"] == f"baked-{storage}_high_noise.safetensors"
    assert Path(recipe["text_encoder"]).is_absolute() and Path(recipe["vae"]).is_file()

    experts, spec, session = loaded_experts(engine, info)
    session.apply(spec, stack, resolve=Path)
    merged = expert_state.of(experts)
    baked_info = {m.id: m for m in engine.model_infos(refresh=True)}[f"baked-{storage}"]
    assert baked_info.ok and baked_info.source == "recipe", baked_info.reason
    baked, _, _ = loaded_experts(engine, baked_info)
    expert_state.assert_same(expert_state.of(baked), merged)
    if storage.startswith("fp8"):
        # the big LoRA outgrew fp8 at the file's scale: the recomputed scale travels in the file (a plain fp8 file
        # gains scale_weight entries and ComfyUI's scaled_fp8 marker for them)
        from engine.models.headers import read_header

        header = read_header(out.with_name(f"baked-{storage}_low_noise.safetensors"))
        assert any(k.endswith(".scale_weight") for k in header.tensors) and "scaled_fp8" in header.tensors
        grown = [k for k, v in merged.items() if k[0] == "low_noise" and k[1].endswith(".scale") and v != 1.0]
        assert grown


def test_an_untouched_expert_is_not_copied(env):
    from engine.lora.bake import merge_model

    engine, models, loras = env
    info = {m.id: m for m in engine.model_infos(refresh=True)}["wan2.2_t2v_14B_fp8_scaled"]
    out = models / "high-only.json"
    report = merge_model(info, _stack((loras / "speed_high_noise.safetensors", 1.0, "high_noise")), out, resolve=Path)
    recipe = json.loads(out.read_text())
    assert report["rewritten"] == ["transformer"]
    assert recipe["transformer_2"] == str(Path(info.files["transformer_2"]).resolve())
    assert not out.with_name("high-only_low_noise.safetensors").exists()


def test_a_failed_bake_leaves_nothing(env, monkeypatch):
    from engine.lora import shards
    from engine.lora.bake import merge_model
    from engine.types import RequestError

    engine, models, loras = env
    info = {m.id: m for m in engine.model_infos(refresh=True)}["wan2.2_t2v_14B_fp32"]
    from engine.models.headers import read_header

    fail_at = len(read_header(info.files["transformer"]).tensors) + 5  # in the second expert's file
    calls = []
    real = shards.ShardWriter.write

    def write(self, name, tensor):
        calls.append(name)
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(shards.ShardWriter, "write", write)
    before = sorted(p.name for p in models.iterdir())
    with pytest.raises(RequestError, match="nothing was left behind"):
        merge_model(info, _stack((loras / "anime-a14b-peft.safetensors", 0.8, "both")), models / "full.json",
                    resolve=Path)
    assert len(calls) == fail_at
    assert sorted(p.name for p in models.iterdir()) == before


def test_facade_merge_and_inspect_on_a_comfyui_model(env):
    engine, models, loras = env
    listed = {v.file for v in engine.loras("demo-wan2.2-t2v-a14b")}
    lora = next(f for f in listed if f.endswith("anime-a14b-peft.safetensors"))
    info = engine.inspect_lora(lora, "wan2.2_t2v_14B_fp8_scaled")
    assert info["compatible"] and info["model"]["source"] == "comfyui" and info["model"]["storage"] == "fp8_scaled"
    assert all(c["applied"] == c["total"] > 0 for c in info["coverage_by_expert"].values())
    report = engine.merge_stack("wan2.2_t2v_14B_fp8_scaled", _stack((lora, 0.5, "both")), "ui-baked")
    assert Path(report["out"]) == models / "ui-baked.json"
    assert {m.id: m for m in engine.model_infos()}["ui-baked"].storage == "fp8_scaled"
    views = {v.id: v for v in engine.models()}  # what the page and the /models API show
    assert views["ui-baked"].source == "recipe" and views["ui-baked"].storage == "fp8_scaled"
    assert views["wan2.2_t2v_14B_fp8_scaled"].files["transformer"] == "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_cli_inspect_and_merge_take_comfyui_ids_and_refuse_gguf(comfy_tree, tmp_path):
    lora = comfy_tree / "loras" / "demo" / "anime-a14b-peft.safetensors"
    res = _cli("lora", "inspect", str(lora), "--comfyui", str(comfy_tree), "--models-dir", str(tmp_path),
               "--model", "wan2.2_t2v-14B-Q8_0", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["model"]["storage"] == "gguf-Q8_0" and info["coverage"]["applied"] == info["coverage"]["total"] > 0

    res = _cli("lora", "merge", "--comfyui", str(comfy_tree), "--model", "wan2.2_t2v-14B-Q8_0", "--lora", str(lora),
               "--out", str(tmp_path / "q.json"), cwd=tmp_path)
    assert res.returncode == 2 and "GGUF" in res.stderr and "run time" in res.stderr and "Traceback" not in res.stderr
    res = _cli("lora", "merge", "--comfyui", str(comfy_tree), "--model", "wan2.2_t2v_14B_bf16", "--lora", str(lora),
               "--out", str(tmp_path / "folder"), cwd=tmp_path)
    assert res.returncode == 2 and "name a new .json file" in res.stderr
    res = _cli("lora", "merge", "--comfyui", str(comfy_tree), "--model", "wan2.2_t2v_14B_bf16", "--lora", str(lora),
               "--dtype", "fp16", "--out", str(tmp_path / "x.json"), cwd=tmp_path)
    assert res.returncode == 2 and "keeps its storage (bf16)" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    res = _cli("lora", "merge", "--comfyui", str(comfy_tree), "--model", "wan2.2_t2v_14B_bf16", "--lora",
               f"{lora}=0.7", "--out", str(tmp_path / "anime.json"), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = _cli("lora", "merge", "--comfyui", str(comfy_tree), "--model", "wan2.2_t2v_14B_bf16", "--lora", str(lora),
               "--out", str(tmp_path / "anime.json"), cwd=tmp_path)
    assert res.returncode == 2 and "already exists" in res.stderr
    res = _cli("models", "--models-dir", str(tmp_path), "--json", cwd=tmp_path)
    [row] = json.loads(res.stdout)["models"]
    assert row["id"] == "anime" and row["ok"] and row["source"] == "recipe" and row["storage"] == "bf16"
