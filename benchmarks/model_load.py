"""Load time and peak RAM of one transformer expert in each storage, beside the diffusers folder.

Builds a Wan2.1-1.3B-shaped transformer (the real width 1536, ffn 8960, text_dim 4096; fewer blocks so it
fits a small machine, default 4 = about 0.2B parameters), writes it as a diffusers folder (fp32 shards, as
the Wan-AI *-Diffusers repos ship) and as single files in every storage WanStack reads: bf16, fp16, fp32
(ComfyUI names, `model.diffusion_model.` prefix), fp8_e4m3fn, ComfyUI scaled fp8, GGUF Q8_0 and Q4_0.
Each is then loaded in its own child process the way the generator loads it (compute dtype bf16, as on a
GPU), and the child reports the seconds of the load, its peak resident set (VmHWM) above the baseline after
imports, and the bytes its parameters hold. Prints a table, or one JSON object with --json.

    .venv/bin/python benchmarks/model_load.py [--layers 4] [--repeats 2] [--workdir DIR] [--json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/model_load.py`
    sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import torch, diffusers, gguf, safetensors  # imports count in the baseline
from diffusers import WanTransformer3DModel
from engine.models.catalog import CATALOG
from engine.models import load
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
base = hwm()
t0 = time.perf_counter()
path = {path!r}
if path.endswith("folder"):
    module = WanTransformer3DModel.from_pretrained(path, torch_dtype=torch.bfloat16)
else:
    module, _, _ = load.load_transformer(path, CATALOG["wan2.1-t2v-1.3b"], torch.bfloat16)
seconds = time.perf_counter() - t0
held = sum(p.numel() * p.element_size() for p in module.parameters())
print(json.dumps({{"seconds": seconds, "peak_rss_bytes": hwm() - base, "param_bytes": held}}), file=sys.stderr)
"""


def build(workdir: Path, layers: int) -> dict[str, Path]:
    import torch
    from diffusers import WanTransformer3DModel

    from engine.models.load import shipped_config
    from engine.models.testdata import write_gguf, write_transformer

    cfg = {k: v for k, v in shipped_config("transformer-wan2.1-t2v-1.3b").items() if not k.startswith("_")}
    cfg["num_layers"] = layers
    torch.manual_seed(0)
    module = WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    files = {"diffusers folder (fp32)": workdir / "folder"}
    if not files["diffusers folder (fp32)"].exists():
        module.save_pretrained(files["diffusers folder (fp32)"], max_shard_size="200MB")
    for storage in ("fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_scaled"):
        path = workdir / f"wan2.1_t2v_1.3B_{storage}.safetensors"
        if not path.exists():
            # The file carries its (cut-down) config in metadata, as WanStack's test files do.
            write_transformer(module, path, storage, prefix="model.diffusion_model.")
        files[storage] = path
    for q in ("Q8_0", "Q4_0"):
        path = workdir / f"wan2.1_t2v_1.3B-{q}.gguf"
        if not path.exists():
            write_gguf(module, path, q)
        files[f"gguf-{q}"] = path
    return files


def child(path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), path=str(path))],
                          capture_output=True, text=True, timeout=1200)
    for line in reversed(proc.stderr.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"loading {path} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="loads per storage; the fastest is kept")
    ap.add_argument("--workdir", help="keep the written files here (reused when present)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="wanstack-load-")
        workdir = Path(tmp.name)
    files = build(workdir, args.layers)
    rows = {}
    for name, path in files.items():
        runs = [child(path) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
        rows[name] = {**best, "file_bytes": size, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs)}
    if tmp is not None:
        tmp.cleanup()
    if args.json:
        print(json.dumps({"layers": args.layers, "compute_dtype": "bf16", "storages": rows}))
        return
    mib = 1 << 20
    print(f"one expert, Wan2.1-1.3B shape with {args.layers} blocks; loaded for bf16 compute on the CPU")
    print(f"{'storage':26} {'file MiB':>9} {'load s':>7} {'peak RSS MiB':>13} {'params MiB':>11}")
    for name, r in rows.items():
        print(f"{name:26} {r['file_bytes'] / mib:9.0f} {r['seconds']:7.2f} {r['peak_rss_bytes'] / mib:13.0f} "
              f"{r['param_bytes'] / mib:11.0f}")


if __name__ == "__main__":
    main()
