"""Exercise 6.1: ACT's halting weights

Write `act_halting(gate, eps=0.01)`, Adaptive Computation Time's reading of a looped model's
gate outputs (chapter 6, section 6.1). The gates h_n = gate[n - 1], n = 1 .. S, are increments
of a halting budget, not conditional probabilities:

    N = the first n with h_1 + ... + h_n >= 1 - eps, or S if there is none
    R = 1 - (h_1 + ... + h_{N-1})                       the remainder
    w_n = h_n for n < N,  w_N = R,  w_n = 0 for n > N  the weight of step n; they sum to 1

- gate: a floating-point tensor [S, ...] with values in [0, 1] (steps first, then any token
  dimensions, as `LoopOutput.gate` [S, B, T]); every token is read independently.
- Return (weights, n_halt, remainder): weights of gate's shape and dtype, n_halt a LongTensor of
  the token shape holding N counted from 1, remainder of the token shape.
- eps is a number in [0, 1). Raise ValueError for an eps outside that range, for a gate that is
  not a floating-point tensor with at least one step, and for gate values outside [0, 1].

Do not call `looplm.objectives.act_halting`. Grade it with `python -m looplm.grade ch06`.
"""

import torch


def act_halting(gate: torch.Tensor, eps: float = 0.01):
    """ACT's weights [S, ...], halting step N [...] (from 1) and remainder R [...] from the gates."""
    raise NotImplementedError("Exercise 6.1: write act_halting")
