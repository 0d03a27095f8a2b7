"""`lora inspect|merge` commands; `lora extract|convert` come from engine/cli/lora_tools.py."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from engine.dtypes import CAST_CHOICES
from engine.types import Stack

# Modules that add more subcommands to the `lora` group: each has register(lora_sub).
TOOL_MODULES = ("engine.cli.lora_tools",)


def register(sub) -> None:
    group = sub.add_parser("lora", help="inspect LoRA files, bake stacks into a model copy")
    lora_sub = group.add_subparsers(dest="lora_command", required=True, metavar="LORA_COMMAND")

    p = lora_sub.add_parser("inspect", help="format, rank, alpha, family, experts; coverage against --model")
    p.add_argument("file", type=Path, help="LoRA file (.safetensors)")
    p.add_argument("--model", help="report coverage and compatibility against this model: a listed model id, "
                                   "a diffusers model folder or a recipe .json")
    add_model_source_arguments(p)
    p.add_argument("--allow-pickle", action="store_true", help="also read .pt/.ckpt/.bin with torch.load(weights_only=True)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = lora_sub.add_parser("merge", help="write a copy of a model with a LoRA stack baked into its experts")
    p.add_argument("--model", required=True, help="source model (never written): a listed model id, a diffusers "
                                                  "model folder or a recipe .json")
    add_model_source_arguments(p)
    p.add_argument("--lora", required=True, action="append", metavar="SPEC",
                   help="PATH[=WEIGHT[,APPLIES_TO]]; repeatable, applied in order")
    p.add_argument("--out", required=True, type=Path,
                   help="new model folder to write (must not exist); for a recipe or --comfyui model, a new recipe "
                        ".json (its merged expert files are written beside it)")
    p.add_argument("--dtype", choices=CAST_CHOICES,
                   help="cast the experts' weights (merged on the cast weights); default: keep the stored dtype")
    p.add_argument("--skip-failing", action="store_true", help="leave out a LoRA that fails to load, and report it")
    p.add_argument("--allow-pickle", action="store_true", help="also read .pt/.ckpt/.bin with torch.load(weights_only=True)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_merge)

    for name in TOOL_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(lora_sub)


def add_model_source_arguments(p) -> None:
    p.add_argument("--models-dir", default="models", help="where model ids and recipes are looked up")
    p.add_argument("--comfyui", metavar="DIR", help="an existing ComfyUI models/ folder (its models are listed too)")


def cmd_inspect(args):
    from engine.cli.core import resolve_model
    from engine.lora.library import LoraLibrary

    file = args.file.expanduser().resolve()
    model = resolve_model(args.model, args.models_dir, args.comfyui) if args.model else None
    info = LoraLibrary(file.parent, allow_pickle=args.allow_pickle).inspect(file, model)
    if args.json:
        return info
    return _inspect_table(info)


def _inspect_table(info: dict) -> str:
    lines = [f"{info['file']}  ({info['size_bytes']:,} bytes, sha256 {info['sha256'][:12]}…)",
             f"  format     {info['format']}  (naming: {info['naming']})",
             f"  rank/alpha {info['rank']} / {info['alpha']}   dtype {info['dtype']}",
             f"  family     {info['family']} (width {info['width']})   image keys: {info['image_keys']}",
             f"  experts    {info['expert_hint'] or 'not stated'}",
             f"  targets    {info['targets']} ({', '.join(f'{k} {v}' for k, v in info['targets_by_area'].items())})",
             f"  to apply   ~{info['apply_memory_bytes'] / 2**20:.1f} MiB"]
    if info.get("trigger_words"):
        lines.append(f"  triggers   {', '.join(info['trigger_words'][:8])}")
    if "model" in info:
        cov = info["coverage"]
        lines.append(f"  on {info['model']['label']}: {'compatible' if info['compatible'] else 'NOT compatible'}"
                     f"{' — ' + info['reason'] if info['reason'] else ''}")
        lines.append(f"  coverage   {cov['applied']}/{cov['total']} keys applied, {len(cov['skipped'])} skipped, "
                     f"{len(cov['unmatched'])} unmatched, {len(cov['shape_mismatch'])} shape mismatches")
        for expert, c in info["coverage_by_expert"].items():
            lines.append(f"    {expert:10} {c['applied']}/{c['total']}")
    return "\n".join(lines)


def cmd_merge(args):
    from engine.cli.core import parse_lora_spec, resolve_model
    from engine.cli.lora_tools import TerminalProgress
    from engine.lora.bake import merge_model

    stack = Stack(tuple(parse_lora_spec(s) for s in args.lora))
    model = resolve_model(args.model, args.models_dir, args.comfyui)
    progress = TerminalProgress("merge")
    try:
        report = merge_model(model, stack, args.out, dtype=args.dtype, skip_failing=args.skip_failing,
                             allow_pickle=args.allow_pickle, progress=progress)
    finally:
        progress.close()
    if args.json:
        return report
    lines = [f"wrote {report['out']} ({report['model_type']})"]
    for row in report["loras"]:
        cov = ", ".join(f"{e} {c['applied']}/{c['total']}" for e, c in row["coverage_by_expert"].items())
        lines.append(f"  {row['status']:8} {row['file']}  weights {row['weights']}  keys {cov}")
        lines += [f"    warning: {w}" for w in row["warnings"]]
    return "\n".join(lines)
