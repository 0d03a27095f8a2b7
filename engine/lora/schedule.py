"""Weight schedules: a LoRA strength that changes over the denoising steps (DESIGN.md, "Weight schedules").

A schedule is a list of values; the steps it covers are cut into as many equal consecutive runs as
it has values, each run using its value, the way Wan2GP expands its multiplier lists: step i of n
takes value[floor(i * len / n)].
"""
from __future__ import annotations

from typing import Sequence, Union

Weight = Union[float, tuple[float, ...]]


def value_at(values: Sequence[float], step: int, total: int) -> float:
    """The value of a schedule at step `step` (0-based) of `total` steps it covers."""
    if not values:
        raise ValueError("a schedule needs at least one value")
    if total <= 0:
        return float(values[0])
    step = min(max(step, 0), total - 1)
    return float(values[min(len(values) - 1, step * len(values) // total)])


def expand(values: Sequence[float], total: int) -> list[float]:
    """The schedule's value at each of `total` steps."""
    return [value_at(values, i, total) for i in range(total)]


def is_constant(weight) -> bool:
    """A number, or a list whose values are all equal."""
    if isinstance(weight, (int, float)):
        return True
    vals = list(weight)
    return all(v == vals[0] for v in vals)


def constant_value(weight) -> float:
    return float(weight) if isinstance(weight, (int, float)) else float(list(weight)[0])


def format_weight(weight) -> str:
    """`0.8` or `1:0.8:0.5`: the spelling of CLI specs and the UI field."""
    if isinstance(weight, (int, float)):
        return f"{float(weight):g}"
    return ":".join(f"{float(v):g}" for v in weight)


def parse_weight(text: str, field: str = "weight") -> Weight:
    """`0.8` -> 0.8; `1.0:0.8:0.5` -> (1.0, 0.8, 0.5). Raises ValueError naming the bad part."""
    parts = [p.strip() for p in str(text).strip().split(":")]
    vals = []
    for part in parts:
        try:
            vals.append(float(part))
        except ValueError:
            raise ValueError(
                f"{field} {text!r}: {part!r} is not a number; write a number or numbers joined by ':' "
                "(e.g. 1.0:0.8:0.5)") from None
    return vals[0] if len(vals) == 1 else tuple(vals)
