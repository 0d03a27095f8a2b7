"""Weight schedules: a LoRA strength that changes over the denoising steps (DESIGN.md, "Weight schedules").

A schedule is a list of values; the steps it covers are cut into as many equal consecutive runs as
it has values, each run using its value, the way Wan2GP expands its multiplier lists: step i of n
takes value[floor(i * len / n)].
"""
from __future__ import annotations

from typing import Sequence

from engine.types import Weight, format_weight, parse_weight  # noqa: F401  (one spelling of weights, shared with the UI)


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


def strength_for_expert(weight, entry_both_whole_run: bool, expert: str, high_steps: int | None):
    """A (step, total) -> strength function for a scheduled weight on one expert, steps counted over the whole run.

    `entry_both_whole_run`: the schedule covers every step of the run (applies_to both without a
    separate low_noise_weight, or a single-expert model). Otherwise it covers the expert's phase:
    steps [0, high_steps) for high_noise, [high_steps, total) for low_noise.
    """
    values = [float(v) for v in weight] if not isinstance(weight, (int, float)) else [float(weight)]
    if entry_both_whole_run or expert == "single":
        return lambda step, total: value_at(values, step, total)
    if high_steps is None:
        raise ValueError(f"a {expert} schedule needs the number of high-noise steps of the run")
    if expert == "high_noise":
        return lambda step, total: value_at(values, step, min(high_steps, total))
    return lambda step, total: value_at(values, step - high_steps, total - high_steps)


def high_noise_steps(timesteps, boundary_timestep: float | None) -> int:
    """How many steps the high-noise expert runs: those with t >= boundary (how the Wan2.2 pipelines switch)."""
    if boundary_timestep is None:
        return len(timesteps)
    return sum(1 for t in timesteps if float(t) >= boundary_timestep)
