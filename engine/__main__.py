"""`python -m engine ...`: the command line. Each command group lives in engine/cli/<group>.py."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from engine.cli import core, lora, memory
from engine.types import WanStackError

GROUPS = (core, memory, lora)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="WanStack engine command line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        result = args.func(args)
    except (WanStackError, ValueError, FileNotFoundError, PermissionError, OSError) as e:
        # One clear line, no traceback: every user-facing error carries its own fix.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if result is None:
        return 0
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    elif isinstance(result, str):
        print(result)
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
