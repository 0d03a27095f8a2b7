"""Launch WanStack: parse flags, build the engine, build the UI, launch Gradio (127.0.0.1 by default)."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from engine.types import OFFLOAD_CHOICES

log = logging.getLogger("wanstack")


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def size_bytes(text: str) -> int:
    """'20mb', '500kb', '1.5gb', '20MiB' or plain bytes -> bytes (argparse type: one clear line on junk)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use a number with kb, mb or gb, e.g. 20mb")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def bounded_int(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} must be between {low} and {high}")
        return value
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="WanStack: a local web UI for Wan 2.x video with LoRA stacks")
    p.add_argument("--listen", action="store_true", help="bind 0.0.0.0 instead of 127.0.0.1 (reachable from the network)")
    p.add_argument("--server-port", type=bounded_int(1, 65535), default=7860)
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (needs --auth)")
    p.add_argument("--share-without-auth", action="store_true",
                   help="allow --share without --auth: anyone with the link can use your GPU and see your outputs")
    p.add_argument("--auth", metavar="USER:PASS", help="require this login")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--comfyui", metavar="DIR", help="an existing ComfyUI models/ folder: its models and loras/ are offered too")
    p.add_argument("--loras-dir", default="loras")
    p.add_argument("--presets-dir", default="presets")
    p.add_argument("--outputs-dir", default="outputs")
    p.add_argument("--data-dir", default="data", help="where the demo model is built when models/ has none")
    p.add_argument("--offload", default="auto", choices=OFFLOAD_CHOICES)
    p.add_argument("--lora-cap", action="append", default=[], metavar="TYPE=N",
                   help="most enabled LoRAs per expert for a model type, e.g. wan2.2-t2v-a14b=3 (repeatable)")
    p.add_argument("--queue-size", type=bounded_int(1, 1000), default=8,
                   help="jobs that may wait (1-1000); more get 'queue full'")
    p.add_argument("--max-upload", type=size_bytes, default="20mb",
                   help="largest upload or request body (start image, preset), e.g. 20mb")
    p.add_argument("--ignore-memory-plan", action="store_true",
                   help="run requests the memory plan says cannot fit (by default they are refused with the reason)")
    p.add_argument("--no-demo", action="store_true", help="do not build the demo model when no real model is found")
    from engine.cli.core import add_speed_arguments

    add_speed_arguments(p)  # --attention, --compile / --no-compile: defaults for every run from the page
    return p.parse_args(argv)


def check_share(args: argparse.Namespace) -> str | None:
    """Why the flags are refused (None when fine)."""
    if args.share and not args.auth and not args.share_without_auth:
        return ("--share publishes this app on a public gradio.live URL; without --auth anyone who gets the link "
                "can run jobs on your GPU and download your outputs. Add --auth USER:PASS, or pass "
                "--share-without-auth if you really want it open.")
    if args.auth and ":" not in args.auth:
        return "--auth must look like USER:PASS"
    return None


def clean_leftovers(dirs: dict[str, Path]) -> None:
    """Temp files of writes that a killed process left (never under a final name), and old stream segments."""
    import shutil

    from engine.fileio import clean_stale_temps

    for key in ("outputs_dir", "presets_dir", "models_dir", "loras_dir", "data_dir"):
        clean_stale_temps(dirs[key])
    shutil.rmtree(dirs["outputs_dir"] / ".stream", ignore_errors=True)


def build(args: argparse.Namespace):
    """Engine + UI + the launch() keyword arguments."""
    from engine.models.catalog import parse_lora_caps
    from engine.facade import Engine, Settings
    from engine.types import WanStackError

    try:
        caps = parse_lora_caps(args.lora_cap)
    except WanStackError as e:
        raise SystemExit(f"error: {e}") from None
    dirs = {k: Path(getattr(args, k)).resolve() for k in ("models_dir", "loras_dir", "presets_dir", "outputs_dir", "data_dir")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    clean_leftovers(dirs)
    comfyui = None
    if getattr(args, "comfyui", None):
        from engine.models.comfyui import check_root

        try:
            comfyui = check_root(args.comfyui).resolve()
        except WanStackError as e:
            raise SystemExit(f"error: {e}") from None
    engine = Engine(Settings(offload=args.offload, lora_caps=caps, ignore_memory_plan=args.ignore_memory_plan,
                             comfyui_dir=comfyui, attention=args.attention, compile=args.compile, **dirs))
    if not args.no_demo and not any(m.ok and not m.demo for m in engine.model_infos()):
        log.info("no real model in %s: using the demo model (random weights)", dirs["models_dir"])
        engine.ensure_demo_model()

    # a local app: no telemetry or version pings to gradio.app (read by gradio.analytics at call time)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from starlette.middleware import Middleware

    from ui import CSS, THEME, build_ui
    from ui.limits import BodyLimit, body_limit_for

    demo = build_ui(engine)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    launch = dict(
        server_name="0.0.0.0" if args.listen else "127.0.0.1",
        server_port=args.server_port,
        share=args.share,
        auth=tuple(args.auth.split(":", 1)) if args.auth else None,
        allowed_paths=[str(dirs["outputs_dir"])],
        blocked_paths=[str(dirs[k]) for k in ("models_dir", "loras_dir", "presets_dir", "data_dir")]
        + ([str(comfyui)] if comfyui else []),
        max_file_size=args.max_upload,
        # JSON bodies (a data: image, a huge stack) are bounded too, not only file uploads
        app_kwargs={"middleware": [Middleware(BodyLimit, max_bytes=body_limit_for(args.max_upload))]},
        theme=THEME,
        css=CSS,
        footer_links=["api"],
        show_error=True,
    )
    return engine, demo, launch


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    problem = check_share(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    _, demo, launch = build(args)
    demo.launch(**launch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
