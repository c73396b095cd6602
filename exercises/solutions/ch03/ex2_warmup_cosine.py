"""Exercise 3.2: The warmup-cosine learning-rate schedule

Reference solution. See exercises/ch03/ex2_warmup_cosine.py for the task.
"""

import math


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, max_lr: float, min_lr: float) -> float:
    """The learning rate of update `step`: linear warmup from 0 to max_lr, cosine down to min_lr."""
    if not _is_int(step) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not _is_int(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not _is_int(warmup_steps) or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}), got {warmup_steps!r}")
    if not max_lr > 0:
        raise ValueError(f"max_lr must be > 0, got {max_lr!r}")
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"min_lr must be in [0, max_lr={max_lr}], got {min_lr!r}")
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return float(min_lr)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))
