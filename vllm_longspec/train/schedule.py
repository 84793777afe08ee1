"""Learning rate of a stage: linear warmup, then cosine decay to a floor.

A pure function of the step, so the "scheduler state" in a checkpoint is just
the step number (and resuming cannot drift).
"""

from __future__ import annotations

import math


def warmup_cosine_lr(
    step: int,  # 0-based step within the stage
    total_steps: int,
    peak_lr: float,
    warmup_fraction: float,
    min_lr_ratio: float = 0.0,
) -> float:
    warmup_steps = math.ceil(warmup_fraction * total_steps)
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
