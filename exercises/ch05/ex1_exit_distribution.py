"""Exercise 5.1: The exit distribution

Write `exit_distribution(gate)`, Ouro's Eq. 3 (section 5.2 of chapter 5): turn the exit gates
λ_1 .. λ_S of every token into the probability p(t | x) that the token stops at step t.

- gate: a floating-point tensor [S, ...] with S >= 1 steps first (the model gives [S, B, T]),
  every value in [0, 1]. Steps are counted from 1 in the formulas and from 0 in the tensor.
- Return a tensor of the same shape and dtype, where, with r_t = ∏_{j<=t} (1 − λ_j) the
  probability of surviving the first t steps (r_0 = 1):

      p_t = λ_t · r_{t-1}          for t = 1 .. S-1
      p_S = r_{S-1}                the last step takes the remaining mass; λ_S is not used

  so the p_t sum to 1 over the steps for every token. With S = 1, p_1 = 1.
- Work on every token at once (no Python loop over tokens). Gradients must flow from p back
  to the gate.
- Raise ValueError when gate is not a floating-point tensor, has no step dimension (0-d) or
  S = 0 steps, holds NaN or inf, or holds a value outside [0, 1].

Do not call `looplm.adaptive.exit_distribution`: the point is to write it. Grade it with
`python -m looplm.grade ch05`, or run `pytest exercises/ch05/test_ex1_exit_distribution.py`.
"""

import torch


def exit_distribution(gate: torch.Tensor) -> torch.Tensor:
    """p(t | x) from the exit gates: gate [S, ...] -> [S, ...], summing to 1 over the steps."""
    raise NotImplementedError("Exercise 5.1: write exit_distribution")
