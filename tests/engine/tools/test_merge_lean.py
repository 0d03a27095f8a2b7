"""The lean `lora merge`: --dtype, linked unchanged components, exact vs in-place, one-line failures, no partial folder."""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from engine.__main__ import main
from engine.lora import shards
from engine.lora.shards import TensorReader

A14B = "wan2.2-t2v-a14b"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def high_noise_lora(path, width: int = 32) -> None:
    g = torch.Generator().manual_seed(11)
    sd = {}
    for block in range(2):
        for module, (o, i) in {"self_attn.q": (width, width), "ffn.0": (32, width)}.items():
            sd[f"diffusion_model.blocks.{block}.{module}.lora_down.weight"] = torch.randn(4, i, generator=g) * 0.2
            sd[f"diffusion_model.blocks.{block}.{module}.lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.2
            sd[f"diffusion_model.blocks.{block}.{module}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(path))


@pytest.mark.slow
def test_bf16_merge_equals_in_place_application_on_a_bf16_model(demo_model, tmp_path, capsys):
    from diffusers import WanTransformer3DModel

    from engine.models.catalog import get_spec
    from engine.lora.manager import LoraManager
    from engine.types import LoraEntry, Stack

    src = demo_model(A14B)
    lora = tmp_path / "speed_high.safetensors"
    high_noise_lora(lora)
    out = tmp_path / "merged-bf16"
    code, stdout, err = run(capsys, "lora", "merge", "--model", src, "--lora", f"{lora}=0.9,high_noise",
                            "--out", out, "--dtype", "bf16", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["rewritten"] == ["transformer", "transformer_2"]  # --dtype casts both experts
    assert report["changed_tensors"] == {"transformer": 4, "transformer_2": 0}
    assert report["loras"][0]["status"] == "applied"
    assert report["loras"][0]["weights"] == {"high_noise": 0.9, "low_noise": 0.0}
    # Components the merge does not change are hard links to the source files.
    for rel in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for f in (src / rel).rglob("*"):
            if f.is_file():
                assert os.path.samefile(f, out / rel / f.relative_to(src / rel)), f
    assert json.loads((out / "wanstack_merge.json").read_text())["dtype"] == "bf16"

    spec = get_spec("demo-" + A14B)
    stack = Stack((LoraEntry(str(lora), 0.9, "high_noise"),))
    for expert, component in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
        live = WanTransformer3DModel.from_pretrained(src, subfolder=component, torch_dtype=torch.bfloat16)
        LoraManager(tmp_path).apply({expert: live}, spec, stack, resolve=lambda f: lora)
        want = live.state_dict()
        with TensorReader(out / component) as merged:
            for name in merged.keys():
                got = merged.get(name)
                assert got.dtype == want[name].dtype  # bf16, or fp32 where diffusers keeps fp32 (norms, tables)
                assert torch.equal(got, want[name]), (component, name)
        assert {v.dtype for v in want.values()} == {torch.bfloat16, torch.float32}


def test_unchanged_expert_is_linked_and_source_untouched(demo_model, tmp_path, capsys):
    src = demo_model(A14B)
    lora = tmp_path / "speed_high.safetensors"
    high_noise_lora(lora)
    stamp = {p: p.stat().st_mtime_ns for p in src.rglob("*") if p.is_file()}
    out = tmp_path / "merged"
    code, stdout, err = run(capsys, "lora", "merge", "--model", src, "--lora", f"{lora}=1,high_noise", "--out", out,
                            "--json")
    assert code == 0, err
    assert json.loads(stdout)["rewritten"] == ["transformer"]
    for f in (src / "transformer_2").iterdir():
        assert os.path.samefile(f, out / "transformer_2" / f.name)
    for f in (src / "transformer").glob("*.safetensors"):
        assert not os.path.samefile(f, out / "transformer" / f.name)
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*") if p.is_file()} == stamp


def test_merge_output_inside_the_source_is_one_line(demo_model, tmp_path, capsys):
    src = demo_model("wan2.1-t2v-1.3b")
    lora = tmp_path / "l.safetensors"
    high_noise_lora(lora, width=16)
    capsys.readouterr()
    code, stdout, err = run(capsys, "lora", "merge", "--model", src, "--lora", lora, "--out", src / "merged")
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "inside the source model" in err
    assert not (src / "merged").exists()


def test_disk_full_during_merge_leaves_no_partial_folder(demo_model, tmp_path, capsys, monkeypatch):
    src = demo_model("wan2.1-t2v-1.3b")
    lora = tmp_path / "l.safetensors"
    high_noise_lora(lora, width=16)
    writes = {"n": 0}
    real_write = shards.ShardWriter.write

    def full_disk(self, name, tensor):
        writes["n"] += 1
        if writes["n"] == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, name, tensor)

    monkeypatch.setattr(shards.ShardWriter, "write", full_disk)
    out_root = tmp_path / "models"
    out_root.mkdir()
    capsys.readouterr()
    code, stdout, err = run(capsys, "lora", "merge", "--model", src, "--lora", lora, "--out", out_root / "merged")
    assert writes["n"] == 7
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("error: disk full while writing")
    assert list(out_root.iterdir()) == []  # neither the output nor the temp folder
