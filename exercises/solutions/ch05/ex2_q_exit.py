"""Exercise 5.2: The Q-exit rule

Reference solution. See exercises/ch05/ex2_q_exit.py for the task.
"""

import math

import torch

from looplm.adaptive import exit_distribution


def q_exit_steps(gate: torch.Tensor, q: float, min_steps: int = 1) -> torch.Tensor:
    """The first step t (from 1) with CDF_t >= q and t >= min_steps, else S: LongTensor [...]."""
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or not 0 < q <= 1:
        raise ValueError(f"q must be a number in (0, 1], got {q!r}")
    probs = exit_distribution(gate)                               # checks the gate: (S, ...)
    n_steps = gate.shape[0]
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or not 1 <= min_steps <= n_steps:
        raise ValueError(f"min_steps must be an int in [1, S={n_steps}], got {min_steps!r}")
    reached = probs.cumsum(0) >= q                                # CDF_t >= q: (S, ...)
    reached[-1] = True                                            # the last step ends every token
    reached[: min_steps - 1] = False                              # never before min_steps
    return reached.long().argmax(0) + 1                           # first True, counted from 1
