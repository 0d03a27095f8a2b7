"""Peak RAM of `python -m engine lora merge` against the size of the model it rewrites.

Builds a demo model whose transformer is made large enough to measure (width 640, 12 blocks, fp32,
about 320 MB in 64 MB shards), a rank-16 LoRA on every attention and feed-forward layer, then runs
the merge in a child process and reads the child's peak resident set (VmHWM). A second child
that only imports what the merge imports gives the baseline, so `merge_extra_bytes` is what the
merge itself adds. Prints one JSON line and a table.

    .venv/bin/python benchmarks/lora_merge_rss.py [--width 640] [--layers 12] [--extra-args "--dtype bf16"]
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
import torch, diffusers, safetensors  # the merge's imports, counted in the baseline too
from engine.lora import manager, shards  # noqa
from diffusers import WanTransformer3DModel  # noqa
code = 0
if {argv!r}:
    from engine.__main__ import main
    code = main({argv!r})
# VmHWM: this process's own peak (ru_maxrss would include the parent's RSS inherited at fork/exec).
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"maxrss_bytes": hwm, "code": code}}), file=sys.stderr)
"""


def child_peak(argv: list[str]) -> int:
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), argv=argv)],
                          capture_output=True, text=True, cwd=ROOT)
    last = proc.stderr.strip().splitlines()[-1]
    result = json.loads(last)
    if result["code"] != 0:
        raise SystemExit(f"merge failed: {proc.stderr}")
    return int(result["maxrss_bytes"])


def build(work: Path, width: int, layers: int) -> tuple[Path, Path, int, int]:
    import shutil

    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from engine.models.demo import build_demo_model

    model = build_demo_model(work / "model", "wan2.1-t2v-14b")
    shutil.rmtree(model / "transformer")
    torch.manual_seed(0)
    big = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=width // 128, attention_head_dim=128, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=width * 4, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )
    big.save_pretrained(model / "transformer", max_shard_size="64MB")
    g = torch.Generator().manual_seed(1)
    lora = {}
    for name, p in big.named_parameters():
        if name.startswith("blocks.") and name.endswith(".weight") and p.ndim == 2:
            module = name.removesuffix(".weight")
            lora[f"transformer.{module}.lora_A.weight"] = torch.randn(16, p.shape[1], generator=g) * 0.01
            lora[f"transformer.{module}.lora_B.weight"] = torch.randn(p.shape[0], 16, generator=g) * 0.01
    save_file(lora, str(work / "lora.safetensors"))
    files = list((model / "transformer").glob("*.safetensors"))
    return model, work / "lora.safetensors", sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--extra-args", default="", help="more `lora merge` arguments, e.g. '--dtype bf16'")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="wanstack-merge-rss-") as tmp:
        work = Path(tmp)
        model, lora, model_bytes, shard_bytes = build(work, args.width, args.layers)
        baseline = child_peak([])
        argv = ["lora", "merge", "--model", str(model), "--lora", str(lora), "--out", str(work / "merged"),
                *shlex.split(args.extra_args)]
        peak = child_peak(argv)
    row = {
        "benchmark": "lora_merge_rss", "transformer_bytes": model_bytes, "largest_shard_bytes": shard_bytes,
        "lora_bytes": None, "baseline_rss_bytes": baseline, "merge_peak_rss_bytes": peak,
        "merge_extra_bytes": peak - baseline, "extra_over_model": round((peak - baseline) / model_bytes, 3),
        "args": args.extra_args,
    }
    row.pop("lora_bytes")
    print(json.dumps(row))
    mib = 2 ** 20
    print(f"{'transformer (fp32)':28} {model_bytes / mib:9.1f} MiB")
    print(f"{'largest shard':28} {shard_bytes / mib:9.1f} MiB")
    print(f"{'baseline process (imports)':28} {baseline / mib:9.1f} MiB")
    print(f"{'merge peak RSS':28} {peak / mib:9.1f} MiB")
    print(f"{'merge extra over baseline':28} {(peak - baseline) / mib:9.1f} MiB  ({row['extra_over_model']:.2f} x model)")


if __name__ == "__main__":
    main()
