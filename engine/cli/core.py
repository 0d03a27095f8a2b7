"""`demo`, `models` and `generate` commands."""
from __future__ import annotations

import sys
from pathlib import Path

from engine.speed.options import SpeedOptions
from engine.types import OFFLOAD_CHOICES, GenerationRequest, LoraEntry, RequestError, Stack


def register(sub) -> None:
    p = sub.add_parser("demo", help="write a tiny random-weight Wan model in diffusers layout")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--arch", default="wan2.1-t2v-1.3b", help="model type whose architecture to copy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loras-dir", help="also write the demo LoRAs for this architecture into this folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="list detected models and their types")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--comfyui", metavar="DIR", help="also assemble models from an existing ComfyUI models/ folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="turn a prompt into an MP4")
    p.add_argument("--model", required=True, help="a listed model id, a diffusers model folder or a recipe .json")
    p.add_argument("--models-dir", default="models", help="where model ids and recipes are looked up")
    p.add_argument("--comfyui", metavar="DIR", help="an existing ComfyUI models/ folder (its models and loras/)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--image", help="start image for I2V / TI2V")
    p.add_argument("--lora", action="append", default=[], metavar="SPEC", help="PATH[=WEIGHT[,APPLIES_TO]], WEIGHT a number or a schedule 1.0:0.8:0.5; repeatable")
    p.add_argument("--preset", help="a named stack from --presets-dir")
    p.add_argument("--presets-dir", default="presets")
    p.add_argument("--loras-dir", default="loras", help="where preset entries are looked up")
    p.add_argument("--skip-failing-loras", action="store_true", help="continue without a LoRA that fails to load")
    p.add_argument("--steps", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--fps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--guidance-2", type=float)
    p.add_argument("--shift", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--offload", default="auto", choices=OFFLOAD_CHOICES)
    add_speed_arguments(p)
    p.add_argument("--cache", default="off", help="step cache: off or first_block (needs 10+ steps)")
    p.add_argument("--cache-threshold", type=float, help="step cache threshold in (0, 1]; higher skips more (default 0.05)")
    p.add_argument("--fp8-compute", action="store_true",
                   help="fp8-stored experts multiply in fp8 on Ada/Hopper GPUs (faster, slightly less precise)")
    p.add_argument("--ignore-memory-plan", action="store_true",
                   help="run even when the memory plan says it cannot fit (refused otherwise)")
    p.add_argument("--out", required=True, help="the MP4 to write")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)


def add_speed_arguments(p) -> None:
    """--attention and --compile/--no-compile, shared by `generate` and app.py."""
    from engine.speed.options import ATTENTION_CHOICES

    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="attention backend (auto: the fastest installed for the device; a missing one falls back to native)")
    p.add_argument("--compile", dest="compile", action="store_const", const="on", default="auto",
                   help="torch.compile the transformer blocks (default: on with CUDA, off on a CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="never compile")


def cmd_demo(args):
    from engine.models.demo import build_demo_model
    from engine.models.detect import detect

    out = build_demo_model(args.out, args.arch, args.seed, loras_dir=args.loras_dir)
    info = detect(out)
    return {"path": str(out), "type": info.type, "ok": info.ok}


def cmd_models(args):
    from engine.models.detect import scan

    if not Path(args.models_dir).is_dir() and not args.comfyui:
        raise RequestError(f"--models-dir {args.models_dir} is not a folder")
    if args.comfyui:
        from engine.models.comfyui import check_root

        check_root(args.comfyui)
    models = [m.to_dict() for m in scan(args.models_dir, args.comfyui)]
    if args.json:
        return {"models": models}
    lines = [f"{m['id']:40} {m['type'] or '-':24} {m['storage_label'] or '-':22} {'ok' if m['ok'] else m['reason']}"
             for m in models]
    return "\n".join(lines) or f"no models in {args.models_dir}"


def resolve_model(model: str, models_dir: str | Path, comfyui: str | None):
    """`--model`: a diffusers folder, a recipe file, or the id of a model listed from models_dir / --comfyui."""
    from engine.models.detect import detect, scan

    p = Path(model)
    if p.is_dir():
        info = detect(p)
    elif p.is_file() and p.suffix == ".json":
        from engine.models.recipes import recipe_info

        info = recipe_info(p, models_dir=Path(models_dir), comfyui_dir=comfyui)
    else:
        if comfyui:
            from engine.models.comfyui import check_root

            check_root(comfyui)
        listed = scan(models_dir, comfyui)
        info = next((m for m in listed if m.id == model), None)
        if info is None:
            names = ", ".join(m.id for m in listed if m.ok) or "none"
            raise RequestError(f"--model {model}: no such folder, recipe or model id; listed models: {names}")
    if not info.ok:
        raise RequestError(f"--model {model}: {info.reason}")
    return info


def parse_lora_spec(spec: str) -> LoraEntry:
    """`PATH[=WEIGHT[,APPLIES_TO]]` -> LoraEntry; WEIGHT is a number or a schedule `1.0:0.8:0.5`."""
    path, _, rest = spec.partition("=")
    weight, applies_to = 1.0, "both"
    if rest:
        w, _, a = rest.partition(",")
        from engine.lora.schedule import parse_weight

        try:
            weight = parse_weight(w)  # a number, or a schedule 1.0:0.8:0.5
        except ValueError:
            raise RequestError(f"--lora {spec!r}: weight {w!r} is not a number or a schedule like 1.0:0.8:0.5 "
                               "(form PATH[=WEIGHT[,APPLIES_TO]])") from None
        applies_to = a or "both"
    if not path:
        raise RequestError(f"--lora {spec!r} has no path (form PATH[=WEIGHT[,APPLIES_TO]])")
    return LoraEntry(file=path, weight=weight, applies_to=applies_to)


def cmd_generate(args):
    from engine.facade import Engine, Settings

    info = resolve_model(args.model, args.models_dir, args.comfyui)
    entries = [parse_lora_spec(s) for s in args.lora]
    loras_dir = Path(args.loras_dir)
    preset = None
    if args.preset:
        preset = _preset_entries(args.preset, Path(args.presets_dir), loras_dir)
        if preset.model_type != info.type:
            print(f"note: preset {preset.name!r} was saved for {preset.model_type}; --model is {info.type}",
                  file=sys.stderr)
        entries = [LoraEntry.from_dict({**e, "file": str((loras_dir / e["file"]).resolve())})
                   for e in preset.entries] + entries
    # CLI paths are the user's own: make them absolute so they do not depend on the LoRA folder.
    entries = [LoraEntry(**{**e.to_dict(), "file": str(Path(e.file).resolve())}) for e in entries]
    if args.comfyui and args.loras_dir == "loras" and not loras_dir.is_dir():
        from engine.models.comfyui import lora_dir

        loras_dir = lora_dir(args.comfyui) or loras_dir
    # the engine lists the model again: a folder or recipe from its own folder, a --comfyui model from the tree
    engine = Engine(Settings(models_dir=Path(args.models_dir) if info.source == "comfyui" else Path(info.path).parent,
                             loras_dir=loras_dir, outputs_dir=Path(args.out).parent, offload=args.offload,
                             allow_lora_paths_outside=True, comfyui_dir=Path(args.comfyui) if args.comfyui else None))
    req = GenerationRequest(
        model=info.path, prompt=args.prompt, negative_prompt=args.negative_prompt, image=args.image,
        width=args.width, height=args.height, frames=args.frames, fps=args.fps, steps=args.steps,
        guidance=args.guidance, guidance_2=args.guidance_2, seed=args.seed, shift=args.shift,
        stack=Stack(tuple(entries)), offload=args.offload, skip_failing_loras=args.skip_failing_loras,
        ignore_memory_plan=args.ignore_memory_plan,
        speed=SpeedOptions(attention=args.attention, compile=args.compile, cache=args.cache,
                           cache_threshold=args.cache_threshold, fp8_compute=args.fp8_compute),
    )
    changes: list[str] = []
    if preset is not None and preset.settings:
        from engine.models.catalog import get_spec
        from engine.speed.presets import apply_settings

        explicit = {name for name in ("steps", "guidance", "guidance_2", "shift") if getattr(args, name) is not None}
        req, changes = apply_settings(req, preset.settings, get_spec(info.type), explicit, preset.name)
        for line in changes:
            print(line, file=sys.stderr)

    from engine.port import Plan, Retry, Status, Step

    def on_event(event):
        if isinstance(event, Step):
            print(f"step {event.step}/{event.total} ({event.expert}) {event.seconds:.2f}s", file=sys.stderr)
        elif isinstance(event, Status):
            print(event.text, file=sys.stderr)
        elif isinstance(event, Retry):
            print(event.message, file=sys.stderr)
        elif isinstance(event, Plan) and event.plan.speed:
            for line in event.plan.speed.get("reasons", []):
                print(line, file=sys.stderr)

    result = engine.generate(req, on_event, out_path=args.out)
    if args.json:
        summary = result.to_dict()
        summary.pop("settings")
        summary["preset_changes"] = changes
        return summary
    return f"wrote {result.path}: {result.frames} frames {result.width}x{result.height}, seed {result.seed}, {result.seconds:.1f}s"


def _preset_entries(name: str, presets_dir: Path, loras_dir: Path):
    """The preset, its rows pointed at their files in the LoRA folder; a missing file is one clear error."""
    from engine.presets import PresetStore, mark_entries
    from engine.speed.presets import locate_files

    preset = PresetStore(presets_dir).load(name)
    available = [p.relative_to(loras_dir).as_posix() for p in loras_dir.rglob("*.safetensors")] if loras_dir.is_dir() else []
    preset.entries = locate_files(preset.entries, available)
    missing = [row["file"] for row in mark_entries(preset.entries, {f: None for f in available})
               if row["status"] == "missing" and row.get("enabled", True)]
    if missing:
        raise RequestError(f"preset {preset.name!r} needs {', '.join(missing)} in {loras_dir}, not there yet. "
                           f"{preset.notes}".strip())
    return preset
