"""The learning-rate schedule every training loop here uses: linear warmup, then a decay to a floor.

``lr_multiplier(step, total, warmup=10)`` is the factor on the peak learning rate at ``step`` (0-based) of a
phase of ``total`` steps. Fine-tuning restarts it at each stage; the reference-model and encoding scripts run one
phase.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_multiplier(
    step: int,
    total: int,
    *,
    warmup: int,
    schedule: str = "cosine",
    min_ratio: float = 0.1,
    decay_from_start: bool = False,
) -> float:
    """Peak-relative learning rate at ``step``.

    ``warmup`` steps ramp linearly to 1; the decay then runs over the remaining steps to ``min_ratio``
    (``decay_from_start``: the decay runs over all ``total`` steps and the warmup ramp multiplies it).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is invalid; valid: {', '.join(SCHEDULES)}")
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if decay_from_start:
        t = step / max(1, total)
    elif step < warmup:
        return ramp
    else:
        t = (step - warmup) / max(1, total - warmup)
    t = min(1.0, t)
    shape = {
        "constant": 1.0,
        "linear": 1 - (1 - min_ratio) * t,
        "cosine": min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)),
    }[schedule]
    return ramp * shape if decay_from_start else shape
