"""Benchmark: per-step cost of the runtime (unmerged) LoRA path beside diffusers' unfused PEFT LoRA.

One WanTransformer3DModel with Wan2.1-1.3B layer shapes (default: 2 blocks, width 1536, ffn 8960; 128 video
tokens, 64 text tokens; fp32 on CPU with one thread, as the machine is shared / bf16 on CUDA), random
weights, and two rank-32 LoRAs on every block Linear (attn1/attn2 q,k,v,o and both ffn layers). One
denoising step = one transformer forward. Timed, interleaved, best of `--repeats` rounds of `--steps`
steps each (the first round is a discarded warm-up):

  base                 the model alone (what a merged stack costs per step: merged = zero extra)
  ours runtime         engine.lora.runtime.RuntimeLoras, a schedule changing both strengths every step
                       (set_step + forward)
  diffusers PEFT       load_lora_adapter x2 (PEFT backend, unfused), set_adapters with the same
                       schedule every step + forward
  diffusers PEFT fixed the same without set_adapters per step (constant weights)

Before timing, both sides' outputs at the same strengths are compared (they compute the same sum).

    python benchmarks/runtime_lora.py [--json] [--small] [--device cpu|cuda] [--steps N] [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=2)  # Wan2.1 1.3B layer shapes
SMALL = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2)
RANK = 32
N_LORAS = 2
BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
SCHEDULES = ([1.0, 0.8, 0.6, 0.4], [0.2, 0.5, 0.8, 1.0])  # per LoRA, spread over the steps


def _build(shape: dict, dtype, device):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=256,
                                  freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                  **shape).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype)


def _loras(model, folder: Path) -> list[Path]:
    """Rank-32 PEFT files (`transformer.` keys, diffusers' own layout) on every block Linear."""
    import torch
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    files = []
    for i in range(N_LORAS):
        g = torch.Generator().manual_seed(100 + i)
        sd = {}
        for name, p in params.items():
            if not name.endswith(".weight") or not any(f".{lin}.weight" in name for lin in BLOCK_LINEARS):
                continue
            mod = name[: -len(".weight")]
            out_f, in_f = p.shape
            sd[f"transformer.{mod}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) / in_f ** 0.5
            sd[f"transformer.{mod}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.02
        path = folder / f"lora_{i}.safetensors"
        save_file(sd, str(path))
        files.append(path)
    return files


def _inputs(model, small: bool, dtype, device):
    import torch

    g = torch.Generator().manual_seed(1)
    frames, hw = (2, 8) if small else (2, 16)  # latent frames, latent height/width: tokens = frames*(hw/2)^2
    return dict(hidden_states=torch.randn(1, 16, frames, hw, hw, generator=g).to(device, dtype),
                timestep=torch.tensor([500], device=device),
                encoder_hidden_states=torch.randn(1, 64 if not small else 8, 256, generator=g).to(device, dtype),
                return_dict=False)


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _time_steps(step_fn, steps: int, device) -> float:
    """Seconds per step over `steps` calls of step_fn(i)."""
    _sync(device)
    t = time.perf_counter()
    for i in range(steps):
        step_fn(i)
    _sync(device)
    return (time.perf_counter() - t) / steps


def run(small: bool, device: str, steps: int, repeats: int) -> dict:
    import torch

    from engine.lora.files import read_lora_file
    from engine.lora.formats import parse_lora
    from engine.lora.runtime import RuntimeLoras
    from engine.lora.schedule import value_at

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    shape = SMALL if small else DEFAULT
    ours = _build(shape, dtype, device)
    peer = _build(shape, dtype, device)
    peer.load_state_dict(ours.state_dict())
    x = _inputs(ours, small, dtype, device)
    tokens = x["hidden_states"].shape[2] * (x["hidden_states"].shape[3] // 2) ** 2
    with tempfile.TemporaryDirectory(prefix="wanstack-runtime-bench-") as tmp:
        files = _loras(ours, Path(tmp))
        patches = [parse_lora(read_lora_file(f)).patches("main") for f in files]
        rt = RuntimeLoras(ours)
        for i, ps in enumerate(patches):
            rt.add(f"lora_{i}", ps, SCHEDULES[i])
        names = [f"lora_{i}" for i in range(N_LORAS)]
        for i, f in enumerate(files):
            peer.load_lora_adapter(str(f.parent), weight_name=f.name, adapter_name=names[i], prefix="transformer",
                                   local_files_only=True)

    def weights_at(i: int) -> list[float]:
        return [value_at(s, i, steps) for s in SCHEDULES]

    with torch.no_grad(), rt:
        # the same sum on both sides: check before timing
        rt.set_step(1, steps)
        peer.set_adapters(names, weights=weights_at(1))
        a, b = ours(**x)[0].float(), peer(**x)[0].float()
        max_abs_diff = float((a - b).abs().max())
        rel = max_abs_diff / float(b.abs().max())

        def base_step(i):
            rt.detach()  # the plain model; attach/detach are outside the timed loop below
            ours(**x)

        def ours_step(i):
            rt.set_step(i, steps)
            ours(**x)

        def peer_step(i):
            peer.set_adapters(names, weights=weights_at(i))
            peer(**x)

        def peer_fixed_step(i):
            peer(**x)

        best = {"base": float("inf"), "ours": float("inf"), "peft": float("inf"), "peft_fixed": float("inf")}
        set_step_s = float("inf")
        for _ in range(repeats + 1):  # the first round warms up and is discarded
            rt.detach()
            t_base = _time_steps(lambda i: ours(**x), steps, device)
            rt.attach()
            t_ours = _time_steps(ours_step, steps, device)
            t0 = time.perf_counter()
            for i in range(steps):
                rt.set_step(i, steps)
            t_set = (time.perf_counter() - t0) / steps
            t_peft = _time_steps(peer_step, steps, device)
            peer.set_adapters(names, weights=weights_at(0))
            t_peft_fixed = _time_steps(peer_fixed_step, steps, device)
            if _ == 0:
                continue
            best = {k: min(best[k], v) for k, v in
                    (("base", t_base), ("ours", t_ours), ("peft", t_peft), ("peft_fixed", t_peft_fixed))}
            set_step_s = min(set_step_s, t_set)
    over_ours = best["ours"] - best["base"]
    over_peft = best["peft"] - best["base"]
    over_fixed = best["peft_fixed"] - best["base"]
    return {
        "device": device, "dtype": str(dtype).replace("torch.", ""), "shape": "small" if small else "default",
        "layers": shape["num_layers"], "width": shape["num_attention_heads"] * shape["attention_head_dim"],
        "tokens": int(tokens), "loras": N_LORAS, "rank": RANK, "steps": steps, "repeats": repeats,
        "base_step_s": best["base"], "ours_runtime_step_s": best["ours"], "peft_step_s": best["peft"],
        "peft_fixed_step_s": best["peft_fixed"], "ours_set_step_s": set_step_s,
        "ours_overhead_s": over_ours, "peft_overhead_s": over_peft, "peft_fixed_overhead_s": over_fixed,
        "ours_overhead_fraction": round(over_ours / best["base"], 4),
        "peft_overhead_fraction": round(over_peft / best["base"], 4),
        "ours_vs_peft_step": round(best["ours"] / best["peft"], 3),
        "ours_vs_peft_overhead": round(over_ours / over_peft, 3) if over_peft > 0 else None,
        "ours_vs_peft_fixed_overhead": round(over_ours / over_fixed, 3) if over_fixed > 0 else None,
        "merged_overhead_s": 0.0,  # a merged stack runs the plain model: its per-step cost is `base`
        "max_abs_diff_vs_peft": max_abs_diff, "rel_diff_vs_peft": rel,
    }


def _table(r: dict) -> str:
    ms = 1e3
    rows = [
        ("shape", f"{r['layers']} blocks, width {r['width']}, {r['tokens']} tokens, {r['loras']} LoRAs of rank "
                  f"{r['rank']}, {r['dtype']} on {r['device']}"),
        ("base (= merged stack)", f"{r['base_step_s'] * ms:.2f} ms/step"),
        ("ours runtime (schedule)", f"{r['ours_runtime_step_s'] * ms:.2f} ms/step  (+{r['ours_overhead_s'] * ms:.2f} ms, "
                                    f"{r['ours_overhead_fraction'] * 100:.1f}%; set_step {r['ours_set_step_s'] * 1e6:.0f} us)"),
        ("diffusers PEFT (schedule)", f"{r['peft_step_s'] * ms:.2f} ms/step  (+{r['peft_overhead_s'] * ms:.2f} ms, "
                                      f"{r['peft_overhead_fraction'] * 100:.1f}%)"),
        ("diffusers PEFT (fixed)", f"{r['peft_fixed_step_s'] * ms:.2f} ms/step  (+{r['peft_fixed_overhead_s'] * ms:.2f} ms)"),
        ("ours / PEFT per step", f"{r['ours_vs_peft_step']}"),
        ("ours / PEFT overhead", f"{r['ours_vs_peft_overhead']}  (fixed weights: {r['ours_vs_peft_fixed_overhead']})"),
        ("same result as PEFT", f"max |diff| {r['max_abs_diff_vs_peft']:.2e} (relative {r['rel_diff_vs_peft']:.1e})"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--small", action="store_true", help="a tiny shape, for a smoke test")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    try:
        import peft  # noqa: F401
    except ImportError:
        print("error: peft is not installed; diffusers' LoRA path needs it (bash scripts/setup.sh --dev)", file=sys.stderr)
        return 2
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    import warnings

    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(1)  # on a shared CPU, thread contention is noise larger than the effect measured
    result = run(args.small, device, args.steps, args.repeats)
    print(json.dumps(result) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
