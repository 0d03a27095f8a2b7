"""Byte sizes: parse "24GiB" / "16GB" / "17179869184" from the command line, and print GiB for people."""
from __future__ import annotations

import re

from engine.types import RequestError

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
# SI units are taken literally (GB = 1e9 bytes); binary units are 2**n. NVML reports bytes, and a
# "16 GB" card really has 16 GiB, so the help text suggests GiB.
_UNITS = {
    "": 1, "b": 1,
    "k": KIB, "kib": KIB, "kb": 1000,
    "m": MIB, "mib": MIB, "mb": 1000**2,
    "g": GIB, "gib": GIB, "gb": 1000**3,
    "t": TIB, "tib": TIB, "tb": 1000**4,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int, name: str = "size") -> int:
    """'24GiB' -> 25769803776. Raises RequestError naming the option and an example."""
    if isinstance(text, int):
        value = text
    else:
        match = _PATTERN.match(str(text))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _UNITS:
            raise RequestError(f"{name} {text!r} is not a size; write bytes or a number with a unit, e.g. 24GiB or 16000MB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 0:
        raise RequestError(f"{name} {text!r} must not be negative")
    return value


def gib(n_bytes: int | float | None) -> str:
    """31.2 GiB (one decimal), or 'n/a'."""
    if n_bytes is None:
        return "n/a"
    return f"{n_bytes / GIB:.1f} GiB"
