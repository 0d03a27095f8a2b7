"""Engine.merge_stack (the UI Tools tab's merge): the current stack becomes a new model in models/."""
from __future__ import annotations

import pytest

from engine.facade import Engine, Settings
from engine.types import LoraEntry, RequestError, Stack


@pytest.fixture
def engine(demo_model, demo_loras_dir, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "demo").symlink_to(demo_model("wan2.1-t2v-1.3b"), target_is_directory=True)
    return Engine(Settings(models_dir=models, loras_dir=demo_loras_dir, data_dir=tmp_path / "data"))


def test_merge_stack_writes_a_detectable_model_into_models_dir(engine):
    stack = Stack((LoraEntry("demo/motion-comfy.safetensors", 0.7), LoraEntry("demo/style-peft.safetensors", 0.5)))
    seen = []
    report = engine.merge_stack("demo", stack, "demo-merged", dtype="bf16", on_progress=lambda d, t, n: seen.append(d))
    assert [r["status"] for r in report["loras"]] == ["applied", "applied"]
    assert seen and seen[-1] == len(seen)
    merged = {m.id: m for m in engine.model_infos()}["demo-merged"]
    assert merged.ok and merged.type == "demo-wan2.1-t2v-1.3b"
    with pytest.raises(RequestError, match="already a model here"):
        engine.merge_stack("demo", stack, "demo-merged")


@pytest.mark.parametrize("name", ["", "../escape", "a/b"])
def test_merge_stack_refuses_names_that_are_not_plain_folders(engine, name):
    stack = Stack((LoraEntry("demo/motion-comfy.safetensors", 0.7),))
    with pytest.raises(RequestError, match="plain folder name"):
        engine.merge_stack("demo", stack, name)


def test_merged_folders_and_outputs_get_the_users_normal_modes(engine, tmp_path):
    """Not 0700/0600 as temp-file helpers make them: the user's umask decides, like any file they save."""
    import os
    import stat

    from engine.run.video import write_sidecar

    umask = os.umask(0o022)
    os.umask(umask)
    engine.merge_stack("demo", Stack((LoraEntry("demo/motion-comfy.safetensors", 0.7),)), "demo-modes")
    folder = engine.settings.models_dir / "demo-modes"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((folder / "model_index.json").stat().st_mode) & 0o044 == 0o044 & ~umask
    sidecar = write_sidecar(tmp_path / "out" / "x.mp4", {"seed": 1})
    assert stat.S_IMODE(sidecar.stat().st_mode) == 0o666 & ~umask
