"""Helpers for the fault tests: fill a disk, run a scripted child Python (a module of its own: every
`conftest` shares one import name, so tests cannot import from theirs)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fill(folder: Path) -> None:
    """Fill the disk under `folder` to the last byte."""
    for name, chunk in (("filler", 4096), ("filler-tail", 1)):
        try:
            with open(folder / name, "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * chunk)
        except OSError:
            pass


def python(code: str, **kw) -> subprocess.Popen:
    """A child Python running `code` with the repo importable."""
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, **kw)
