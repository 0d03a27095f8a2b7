"""A model whose weights are truncated or garbage: one line naming the file and the fix (through the facade,
and on the command line with no traceback), and the engine runs the next, good model as if nothing happened."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.facade import Engine, Settings
from engine.port import Done, Failed
from engine.types import GenerationRequest, RequestError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]
SMALL = "wan2.1-t2v-1.3b"
TRUNCATED = r"is truncated or not a safetensors file \(expected (\d+) bytes, found (\d+)\); download it again"


def _request(model: str) -> GenerationRequest:
    return GenerationRequest(model=model, prompt="a cat", width=32, height=32, frames=5, steps=1, seed=3)


def _cut(path: Path, keep_bytes: int) -> int:
    size = path.stat().st_size
    os.truncate(path, keep_bytes)
    return size


@pytest.fixture
def models(demo_model, tmp_path) -> Path:
    """models/ with the good demo 1.3B (a link) and two damaged copies of it."""
    demo = demo_model(SMALL)
    root = tmp_path / "models"
    root.mkdir()
    (root / "good").symlink_to(demo, target_is_directory=True)
    for name in ("cut", "garbage"):
        shutil.copytree(demo, root / name)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    size = _cut(root / "cut" / weights, 30_000)
    (root / "cut-size").write_text(str(size))
    (root / "garbage" / weights).write_bytes(os.urandom(size))
    return root


def _engine(models: Path, tmp_path: Path) -> Engine:
    return Engine(Settings(models_dir=models, outputs_dir=tmp_path / "out", loras_dir=tmp_path / "loras",
                           data_dir=tmp_path / "data"))


def _fails(engine: Engine, model: str) -> str:
    events = []
    with pytest.raises(RequestError) as err:
        engine.generate(_request(model), events.append)
    message = str(err.value)
    assert "\n" not in message
    assert [e.message for e in events if isinstance(e, Failed)] == [message]  # the one line the page shows
    return message


def test_a_truncated_diffusers_folder_names_the_file_and_the_next_good_run_works(models, tmp_path):
    import re

    engine = _engine(models, tmp_path)
    message = _fails(engine, "cut")
    weights = models / "cut" / "transformer" / "diffusion_pytorch_model.safetensors"
    assert str(weights) in message
    expected, found = map(int, re.search(TRUNCATED, message).groups())
    assert (expected, found) == (int((models / "cut-size").read_text()), 30_000)

    garbage = _fails(engine, "garbage")
    assert str(models / "garbage" / "transformer" / "diffusion_pytorch_model.safetensors") in garbage
    assert "not a safetensors file" in garbage and garbage.endswith("download it again")

    events = []
    result = engine.generate(_request("good"), events.append)  # the same engine is not wedged
    assert Path(result.path).is_file() and isinstance(events[-1], Done)
    assert _fails(engine, "cut") == message  # and a cached good pipeline does not hide a damaged model
    assert Path(engine.generate(_request("good")).path).is_file()


def test_a_truncated_single_file_of_a_recipe_names_the_file(demo_model, tmp_path):
    """The text encoder file is not read when the models are listed; the transformer is cut after listing."""
    import torch
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from engine.models.testdata import write_text_encoder, write_transformer

    demo = demo_model(SMALL)
    root = tmp_path / "models"
    root.mkdir()
    transformer = write_transformer(
        WanTransformer3DModel.from_pretrained(demo, subfolder="transformer", torch_dtype=torch.float32),
        root / "wan2.1_t2v_1.3B_bf16.safetensors", "bf16")
    te = write_text_encoder(UMT5EncoderModel.from_pretrained(demo, subfolder="text_encoder"), root / "umt5.safetensors")
    te_cut = root / "umt5_cut.safetensors"
    shutil.copy(te, te_cut)
    te_size = _cut(te_cut, te.stat().st_size - 3000)
    recipe = {"schema": 1, "transformer": transformer.name, "text_encoder": te.name, "vae": str(demo / "vae"),
              "tokenizer": str(demo / "tokenizer")}
    (root / "good.json").write_text(json.dumps(recipe))
    (root / "te-cut.json").write_text(json.dumps({**recipe, "text_encoder": te_cut.name}))
    engine = _engine(root, tmp_path)
    assert {m.id: m.ok for m in engine.models()} == {"good": True, "te-cut": True}

    message = _fails(engine, "te-cut")
    assert f"{te_cut} is truncated or not a safetensors file (expected {te_size} bytes, found {te_size - 3000})" \
        in message

    assert Path(engine.generate(_request("good")).path).is_file()
    size = _cut(transformer, transformer.stat().st_size - 100)  # damaged after it was listed
    engine.release()  # the loaded pipeline is kept in memory until another model (or a release) drops it
    message = _fails(engine, "good")
    assert f"{transformer} is truncated or not a safetensors file (expected {size} bytes, found {size - 100})" \
        in message


def test_cli_generate_prints_one_line_and_exits_non_zero(models, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--model", str(models / "cut"), "--prompt", "a cat",
         "--steps", "1", "--frames", "5", "--height", "32", "--width", "32", "--out", str(tmp_path / "x.mp4")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(models / "cut" / "transformer" / "diffusion_pytorch_model.safetensors") in errors[0]
    assert errors[0].endswith("download it again")
    assert not (tmp_path / "x.mp4").exists()
