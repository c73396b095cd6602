"""Exercise 5.2: The Q-exit rule

Write `q_exit_steps(gate, q, min_steps=1)`, Ouro's Q-exit (section 5.5 of chapter 5): the step
at which each token stops at inference, read from the cumulative exit distribution.

- gate: a floating-point tensor [S, ...] of exit gates λ, steps first, values in [0, 1].
- p = exit_distribution(gate) (Exercise 5.1; here you may import the book's version with
  `from looplm.adaptive import exit_distribution`), and CDF_t = p_1 + ... + p_t, the cumulative
  sum over the steps (dim 0).
- The exit step of a token is the first step t (counted from 1) with CDF_t >= q and
  t >= min_steps. If no step qualifies, the token uses all S steps: the last step always ends
  a token, even where rounding leaves CDF_S a hair below 1.
- Return a LongTensor with the token shape [...] (the gate's shape without the step dimension)
  holding steps in 1 .. S. Work on every token at once (no Python loop over tokens).
- Raise ValueError when q is not a number in (0, 1] (0, negative, above 1, NaN), when
  min_steps is not an int with 1 <= min_steps <= S, or when the gate holds a value outside
  [0, 1] (the book's exit_distribution already refuses that one).

q is chosen at deployment: a small q stops early, q = 1 runs every step unless some gate is
exactly 1. Do not call `looplm.adaptive.q_exit_steps`: the point is to write it. Grade it with
`python -m looplm.grade ch05`, or run `pytest exercises/ch05/test_ex2_q_exit.py`.
"""

import torch

from looplm.adaptive import exit_distribution  # noqa: F401  (you may use it)


def q_exit_steps(gate: torch.Tensor, q: float, min_steps: int = 1) -> torch.Tensor:
    """The first step t (from 1) with CDF_t >= q and t >= min_steps, else S: LongTensor [...]."""
    raise NotImplementedError("Exercise 5.2: write q_exit_steps")
