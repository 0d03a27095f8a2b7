"""Benchmark: seconds per denoising step, side by side on one model in one run.

Variants (the same pipeline object, set up and torn down between timed runs, untimed):
  none        no LoRA
  merged      a 3-LoRA stack merged into the weights (ours: LoraManager.apply)
  unfused     the same 3 LoRAs through diffusers' PEFT path (load_lora_weights x3 + set_adapters, not fused)
  runtime     the same 3 LoRAs with weight schedules (1.0 -> 0.5): our runtime forward hooks, set_step per step
  compile     the merged stack with the blocks compiled (compile_repeated_blocks, inductor); the stack is
              re-merged before every timed run, and dynamo's counters show whether anything recompiled
  cache       the merged stack with diffusers' First-Block cache (threshold --cache-threshold)

Timing: CFG 1 (one transformer pass per step), prompt embeddings given directly (no text encoder), latents out
(no VAE). A run's figure is its mean step time over steps 2..N (step 1 includes the pipeline's setup). The
machine may be shared, so the variants are interleaved (the order rotates each repeat) and the best run of each
is kept (interference only adds time).

Shapes:
  default   a demo-sized Wan2.1 transformer (2 blocks, width 768, ffn 3072; rank-16 LoRAs have the same
            FLOP share as rank 32 on the real 1.3B: 12.5% for three), 256x256x5 (512 tokens), fp32 on the CPU
  --small   a tiny shape for the smoke test
  --gpu     the real Wan2.1 1.3B shape (30 blocks, width 1536, random weights built here) on CUDA in bf16,
            832x480x33 (14040 tokens): s/step for every usable attention backend, then the variants above with
            the fastest backend. Runs unattended; exits 0 with a note when there is no CUDA device.

    python benchmarks/step_cost.py [--json] [--small | --gpu] [--steps 10] [--repeats 3] [--no-compile]
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

SHAPES = {
    "default": dict(model=dict(num_attention_heads=12, attention_head_dim=64, ffn_dim=3072, num_layers=2),
                    rank=16, height=256, width=256, frames=5, text_tokens=64),
    "small": dict(model=dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2),
                  rank=4, height=64, width=64, frames=5, text_tokens=16),
    "gpu": dict(model=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
                rank=32, height=480, width=832, frames=33, text_tokens=512),
}
TEXT_DIM = 4096
N_LORAS = 3
BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
LABELS = {
    "none": "no LoRA",
    "merged": "3-LoRA stack, merged (ours)",
    "unfused": "same stack, diffusers PEFT unfused",
    "runtime": "same stack, scheduled (runtime hooks)",
    "compile": "merged stack + regional compile",
    "cache": "merged stack + First-Block cache",
}


def build(shape: dict, device, dtype, workdir: Path):
    """A WanPipeline with a random-weight transformer of `shape`, and three LoRA files for it in workdir/loras."""
    import torch
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    with torch.device("meta"):
        transformer = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=TEXT_DIM,
                                            freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                            eps=1e-6, **shape["model"])
    transformer = transformer.to_empty(device=device)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.fill_(1.0)
            elif name.endswith("bias") or "scale_shift_table" in name:
                p.normal_(0.0, 0.01)
            else:
                p.normal_(0.0, 1.0 / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else 0.02)
    if dtype != torch.float32:  # as from_pretrained(torch_dtype=...) does: some modules stay fp32
        keep = tuple(transformer._keep_in_fp32_modules or ())
        transformer = transformer.to(dtype)
        for name, module in transformer.named_modules():
            if name and any(k in name.split(".") for k in keep):
                module.float()
    transformer = transformer.eval()
    from engine.models.demo import _vae

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=_vae(False).to(device), scheduler=scheduler,
                       transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    loras = workdir / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    params = dict(transformer.named_parameters())
    rank = shape["rank"]
    for i in range(N_LORAS):
        g = torch.Generator().manual_seed(100 + i)
        sd = {}
        for b in range(shape["model"]["num_layers"]):
            for lin in BLOCK_LINEARS:
                out_f, in_f = params[f"blocks.{b}.{lin}.weight"].shape
                sd[f"transformer.blocks.{b}.{lin}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
                sd[f"transformer.blocks.{b}.{lin}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
        save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(loras / f"lora_{i}.safetensors"))
    return pipe


class Bench:
    """One pipeline, every variant's setup/teardown, and the timed runs."""

    def __init__(self, pipe, shape: dict, steps: int, device, dtype, workdir: Path, cache_threshold: float,
                 compile_backend: str | None):
        import torch

        from engine.models.catalog import get_spec
        from engine.lora import LoraManager
        from engine.types import LoraEntry, Stack

        self.pipe, self.shape, self.steps, self.device, self.dtype = pipe, shape, steps, device, dtype
        self.loras = workdir / "loras"
        self.files = [f"lora_{i}.safetensors" for i in range(N_LORAS)]
        self.spec = get_spec("wan2.1-t2v-1.3b")
        self.mgr = LoraManager(self.loras)
        self.experts = {"single": pipe.transformer}
        self.stack = Stack(tuple(LoraEntry(f, 1.0) for f in self.files))
        self.scheduled = Stack(tuple(LoraEntry(f, (1.0, 0.5)) for f in self.files))
        self.cache_threshold = cache_threshold
        self.compile_backend = compile_backend
        self.compiled = False
        self.compile_seconds = None
        self.counts: list[dict] = []
        self.cache_counts: list[dict] = []
        g = torch.Generator(device="cpu").manual_seed(0)
        self.embeds = torch.randn(1, shape["text_tokens"], TEXT_DIM, generator=g).to(device, dtype)
        self.set_step = None

    # -- one timed run ---------------------------------------------------------------------------------
    def run(self) -> float:
        import torch

        stamps: list[float] = []

        def on_step(pipe, i, t, kwargs):
            if self.set_step is not None:
                self.set_step(i + 1, self.steps)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return {}

        with torch.no_grad():
            self.pipe(prompt_embeds=self.embeds, height=self.shape["height"], width=self.shape["width"],
                      num_frames=self.shape["frames"], num_inference_steps=self.steps, guidance_scale=1.0,
                      output_type="latent", generator=torch.Generator(device="cpu").manual_seed(1),
                      callback_on_step_end=on_step)
        deltas = [b - a for a, b in zip(stamps, stamps[1:])]
        return sum(deltas) / len(deltas)

    # -- variants --------------------------------------------------------------------------------------
    def _compiled(self, on: bool) -> None:
        from engine.speed.compile import CompilePlan, compile_experts

        if self.compiled:
            compile_experts([self.pipe.transformer], CompilePlan(on, "on" if on else "off", "benchmark",
                                                                 self.compile_backend))

    def timed(self, variant: str) -> float:
        from engine.speed.cache import choose_cache, step_cache
        from engine.speed.compile import dynamo_counts
        from engine.types import Stack

        self._compiled(variant == "compile")
        if variant in ("merged", "compile", "cache"):
            self.mgr.apply(self.experts, self.spec, self.stack)
        elif variant == "runtime":
            report = self.mgr.apply(self.experts, self.spec, self.scheduled, steps=self.steps)
            assert all(row.get("mode") == "runtime" for row in report), report
            self.set_step = self.mgr.set_step
            self.mgr.set_step(0, self.steps)
        elif variant == "unfused":
            for i, f in enumerate(self.files):
                self.pipe.load_lora_weights(str(self.loras), weight_name=f, adapter_name=f"l{i}", local_files_only=True)
            self.pipe.set_adapters([f"l{i}" for i in range(N_LORAS)], [1.0] * N_LORAS)
        try:
            if variant == "compile":
                before = dynamo_counts()
                seconds = self.run()
                self.counts.append({"before": before, "after": dynamo_counts()})
            elif variant == "cache":
                plan = choose_cache("first_block", self.cache_threshold, self.steps)
                with step_cache([self.pipe.transformer], plan) as counter:
                    self.set_step = lambda i, n: counter.end_step() if counter else None
                    seconds = self.run()
                self.cache_counts.append(counter.to_dict() if counter else {"note": plan.note})
            else:
                seconds = self.run()
        finally:
            self.set_step = None
            if variant == "unfused":
                self.pipe.unload_lora_weights()
            elif variant != "none":
                self.mgr.apply(self.experts, self.spec, Stack())  # a stack change for the compiled variant too
        return seconds

    def compile_once(self) -> None:
        """Compile and run once untimed (inductor builds its kernels on the first pass)."""
        from engine.speed.compile import CompilePlan, compile_experts

        t = time.perf_counter()
        compile_experts([self.pipe.transformer], CompilePlan(True, "on", "benchmark", self.compile_backend))
        self.compiled = True
        self.mgr.apply(self.experts, self.spec, self.stack)
        self.run()
        self.compile_seconds = time.perf_counter() - t
        from engine.types import Stack

        self.mgr.apply(self.experts, self.spec, Stack())


def measure(bench: Bench, variants: list[str], repeats: int) -> dict[str, list[float]]:
    # One untimed round first: PEFT's first injection, hook registries created on the blocks by the cache (a
    # one-time recompile of the compiled blocks), allocator warm-up. The timed rounds are the steady state.
    for v in variants:
        bench.timed(v)
    if "compile" in variants:
        bench.counts.clear()
    if "cache" in variants:
        bench.cache_counts.clear()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # interleaved, rotating
        for v in order:
            times[v].append(bench.timed(v))
            print(json.dumps({"progress": v, "repeat": r + 1, "s_per_step": round(times[v][-1], 5)}),
                  file=sys.stderr, flush=True)
    return times


def run(shape_name: str, steps: int, repeats: int, compile_on: bool, cache_threshold: float) -> dict:
    import torch

    gpu = shape_name == "gpu"
    if gpu and not torch.cuda.is_available():
        return {"skipped": "no CUDA device: the --gpu variant needs one"}
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    shape = SHAPES[shape_name]
    out: dict = {"shape": shape_name, "steps": steps, "repeats": repeats, "device": _device_name(device),
                 "dtype": str(dtype).removeprefix("torch."), "model": shape["model"], "lora_rank": shape["rank"],
                 "video": f"{shape['width']}x{shape['height']}x{shape['frames']}"}
    with tempfile.TemporaryDirectory(prefix="step-cost-") as tmp:
        pipe = build(shape, device, dtype, Path(tmp))
        backend = "inductor"
        try:
            import peft  # noqa: F401
            has_peft = True
        except ImportError:
            has_peft = False
            out["unfused_error"] = "peft is not installed (requirements-dev.txt); diffusers' LoRA path needs it"
        bench = Bench(pipe, shape, steps, device, dtype, Path(tmp), cache_threshold, backend)
        if gpu:
            out["attention"] = attention_table(bench, repeats)
            from engine.speed.attention import apply_attention

            best = min((v for v in out["attention"].values() if v.get("s_per_step")), key=lambda v: v["s_per_step"])
            apply_attention([pipe.transformer], best["backend"], device)
            out["attention_used"] = best["backend"]
        variants = ["none", "merged"] + (["unfused"] if has_peft else []) + ["runtime", "cache"]
        times = measure(bench, variants, repeats)
        if compile_on:
            # Compiling takes minutes on a CPU, so the compiled variant is measured after the others, interleaved
            # with fresh no-LoRA runs (its ratio is against those, taken in the same stretch of time).
            from engine.speed.compile import toolchain_problem

            problem = toolchain_problem(device.type, backend)
            if problem:
                out["compile_error"] = problem
            else:
                bench.compile_once()
                out["compile_seconds"] = round(bench.compile_seconds, 1)
                print(json.dumps({"progress": "compiled", "seconds": out["compile_seconds"]}), file=sys.stderr,
                      flush=True)
                more = measure(bench, ["none", "compile"], repeats)
                times["compile"] = more["compile"]
                compile_base = min(more["none"])
                out["none_beside_compile"] = {"s_per_step": round(compile_base, 5),
                                              "runs": [round(t, 5) for t in more["none"]]}
                variants.insert(-1, "compile")
    best = {v: min(ts) for v, ts in times.items()}
    # Each ratio is against the no-LoRA runs interleaved with it: the compiled variant has its own (later) ones.
    base = {v: best["none"] for v in variants}
    if "compile" in times:
        base["compile"] = compile_base
    out["variants"] = {v: {"label": LABELS[v], "s_per_step": round(best[v], 5), "ratio": round(best[v] / base[v], 4),
                           "runs": [round(t, 5) for t in times[v]]} for v in variants}
    if bench.counts:
        recompiles = sum(c["after"]["frames"] - c["before"]["frames"] for c in bench.counts)
        out["variants"]["compile"]["recompiles_across_stack_changes"] = recompiles
        out["variants"]["compile"]["stack_changes"] = 2 * len(bench.counts)
    if bench.cache_counts:
        out["variants"]["cache"]["threshold"] = cache_threshold
        out["variants"]["cache"]["counts"] = bench.cache_counts[-1]
    return out


def attention_table(bench: Bench, repeats: int) -> dict:
    """s/step with no LoRA for every attention backend that passes its test call on this GPU."""
    from engine.speed.attention import apply_attention, usable_backends
    from engine.speed.options import ATTENTION_BACKENDS

    usable = usable_backends()
    table = {}
    for name in ATTENTION_BACKENDS:
        if name == "flex":
            continue  # flex_attention is meant to be compiled; eager it is a reference path, not a speed option
        plan = apply_attention([bench.pipe.transformer], name, bench.device, usable=usable)
        if plan.backend != name:
            table[name] = {"backend": name, "s_per_step": None, "note": plan.reason}
            continue
        runs = [bench.run() for _ in range(repeats)]
        table[name] = {"backend": name, "s_per_step": round(min(runs), 5), "runs": [round(r, 5) for r in runs]}
    apply_attention([bench.pipe.transformer], "native", bench.device, usable=usable)
    return table


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def table(r: dict) -> str:
    if "skipped" in r:
        return r["skipped"]
    lines = [f"step cost on {r['device']} ({r['dtype']}), model {r['model']}, LoRA rank {r['lora_rank']}, "
             f"{r['video']}, {r['steps']} steps, CFG 1, best of {r['repeats']} interleaved runs"]
    if r.get("attention"):
        lines.append("attention backend (no LoRA)       s/step")
        for name, row in r["attention"].items():
            s = f"{row['s_per_step']:.4f}" if row.get("s_per_step") else f"n/a: {row.get('note', '')}"
            lines.append(f"  {name:30} {s}")
        lines.append(f"variants below use: {r['attention_used']}")
    lines.append(f"{'variant':38} {'s/step':>8} {'vs none':>8}")
    for v, row in r["variants"].items():
        note = ""
        if v == "compile":
            note = (f"  compiled in {r.get('compile_seconds')} s; {row['recompiles_across_stack_changes']} recompiles "
                    f"across {row['stack_changes']} stack changes")
        elif v == "cache":
            c = row.get("counts", {})
            note = (f"  threshold {row['threshold']}: {c['steps_computed']} steps computed, {c['steps_skipped']} skipped"
                    if "steps_computed" in c else f"  {c.get('note')}")
        lines.append(f"{row['label']:38} {row['s_per_step']:8.4f} {row['ratio']:7.3f}x{note}")
    for key in ("unfused_error", "compile_error"):
        if r.get(key):
            lines.append(f"{key}: {r[key]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--small", action="store_true", help="tiny shape (smoke test)")
    which.add_argument("--gpu", action="store_true", help="real Wan2.1 1.3B shape on CUDA, every attention backend")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per run (the cache needs 10+)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled variant")
    p.add_argument("--cache-threshold", type=float, default=0.1,
                   help="First-Block cache threshold (random weights change more per step than a trained model)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 3 or args.repeats < 1:
        p.error("--steps must be 3 or more and --repeats 1 or more")
    import logging

    logging.basicConfig(level=logging.WARNING)
    shape = "gpu" if args.gpu else "small" if args.small else "default"
    result = run(shape, args.steps, args.repeats, not args.no_compile, args.cache_threshold)
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
