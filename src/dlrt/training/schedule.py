"""Learning-rate schedules of the recipes: warm-up, then linear, cosine, step or constant, per step."""

from __future__ import annotations

import math

__all__ = ["lr_factor"]


def lr_factor(
    step: int, total: int, schedule: str, warmup_steps: int = 0, step_size: int = 1, gamma: float = 1.0
) -> float:
    """Multiplier of the base learning rate at ``step`` (counted from 0).

    The first ``warmup_steps`` rise linearly towards 1; the remaining steps follow
    ``schedule``: ``linear`` (to 0), ``cosine`` (to 0), ``step`` (× ``gamma`` every
    ``step_size`` steps) or ``constant``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total - warmup_steps)
    t = min(step - warmup_steps, span)
    if schedule == "linear":
        return 1.0 - t / span
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t / span))
    if schedule == "step":
        return gamma ** ((step - warmup_steps) // step_size)
    return 1.0
