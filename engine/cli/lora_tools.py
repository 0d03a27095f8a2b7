"""`lora convert` and `lora extract` subcommands (registered into the `lora` group by engine/cli/lora.py)."""
from __future__ import annotations

import sys
from pathlib import Path

from engine.dtypes import CAST_CHOICES as DTYPES


def register(lora_sub) -> None:
    """Add the tool subcommands to the `lora` group's subparsers."""
    p = lora_sub.add_parser(
        "convert", help="rename a LoRA's keys between diffusers and Wan/ComfyUI names (tensors unchanged)",
        description="Rename every key between diffusers names (transformer.blocks.N.attn1.to_q.lora_A.weight) and "
                    "original Wan / ComfyUI names (diffusion_model.blocks.N.self_attn.q.lora_down.weight). Reads "
                    "every format the app loads; tensors and metadata are kept as they are.",
    )
    p.add_argument("file", type=Path, help="LoRA file (.safetensors)")
    p.add_argument("--to", required=True, choices=("diffusers", "comfy"), help="naming of the output")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    p.add_argument("--allow-pickle", action="store_true", help="also read .pt/.ckpt/.bin (torch.load weights_only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_convert)

    p = lora_sub.add_parser(
        "extract", help="turn the difference of two models of one architecture into a LoRA",
        description="For each Linear weight that differs, store the rank-N truncated SVD of target - source as "
                    "lora_A/lora_B with alpha = rank; changed biases become diff_b and other changed tensors diff. "
                    "Two-expert models give one file with both experts.",
    )
    p.add_argument("--source", required=True, type=Path, help="base model folder (diffusers layout)")
    p.add_argument("--target", required=True, type=Path, help="fine-tuned model folder of the same architecture")
    p.add_argument("--rank", type=int, help="LoRA rank N (not needed with --diff-only)")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    p.add_argument("--diff-only", action="store_true", help="store full differences (diff) instead of low-rank pairs")
    p.add_argument("--dtype", choices=DTYPES, help="stored dtype (default: the target model's)")
    p.add_argument("--format", dest="fmt", choices=("diffusers", "comfy"), default="diffusers",
                   help="key naming of the output (default diffusers)")
    p.add_argument("--json", action="store_true", help="print the report (with per-layer errors) as JSON")
    p.set_defaults(func=cmd_extract)


def cmd_convert(args):
    from engine.lora.convert import convert_file

    report = convert_file(args.file, args.to, args.out, allow_pickle=args.allow_pickle)
    if args.json:
        return report
    return (f"wrote {report['out']}: {report['tensors']} tensors, {report['naming']} -> {report['to']} names, "
            f"experts {'+'.join(report['experts'])}")


class TerminalProgress:
    """A tqdm bar on stderr (shown on a terminal, silent when stderr is not one)."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="tensor", file=sys.stderr, disable=None, leave=False)
        self.bar.set_postfix_str(name[-48:], refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_extract(args):
    from engine.lora.extract import extract_lora
    from engine.types import RequestError

    if args.rank is None and not args.diff_only:
        raise RequestError("--rank N is required (or pass --diff-only to store full differences)")
    progress = TerminalProgress("extract")
    try:
        report = extract_lora(args.source, args.target, args.rank or 0, args.out, diff_only=args.diff_only,
                              dtype=args.dtype, fmt=args.fmt, progress=progress)
    finally:
        progress.close()
    if args.json:
        return report
    lines = [f"{l['layer']:56} {l['kind']:6} {'x'.join(map(str, l['shape'])):>12}"
             + (f"  rel error {l['rel_error']:.2e}" if "rel_error" in l else "") for l in report["layers"]]
    lines.append(
        f"wrote {report['out']}: {report['layers_lora']} LoRA layers"
        + (f" (rank {report['rank']}, max rel error {report['max_rel_error']:.2e})" if report["rank"] else "")
        + f", {report['layers_diff']} full diffs, {report['biases']} bias diffs, {report['unchanged']} unchanged tensors"
    )
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
