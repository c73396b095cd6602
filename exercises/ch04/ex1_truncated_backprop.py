"""Exercise 4.1: Truncated backpropagation

Write `truncated_logits(model, idx, n_loops, grad_steps)`: run a `LoopLM` step by step and
return the logits read out after every step, a tensor [n_loops, B, T, V], where only the last
`grad_steps` steps get gradients (section 4.4 of chapter 4; Huginn trains this way). With
S = n_loops and k = grad_steps:

- Steps 1..S-k, and their readouts, record nothing for backward: their memory is freed at
  once and no gradient flows through them.
- Steps S-k+1..S run with autograd as usual.
- Raise ValueError unless grad_steps is an int with 1 <= grad_steps <= n_loops.

Build it from the model's own parts, the ones `LoopLM.forward` is built from, so that
whatever the config puts behind them (a prelude, a coda, an injection) keeps working.

The values must equal `model(idx, n_loops=n_loops).logits`. Do not pass `grad_steps=` to
the model: the point is to write it. Grade it with
`python -m looplm.grade ch04`, or run `pytest exercises/ch04/test_ex1_truncated_backprop.py`.
"""

import torch

from looplm.model import LoopLM


def truncated_logits(model: LoopLM, idx: torch.Tensor, n_loops: int, grad_steps: int) -> torch.Tensor:
    """Logits after each of n_loops steps, [n_loops, B, T, V]; only the last grad_steps are differentiated."""
    raise NotImplementedError("Exercise 4.1: write truncated_logits")
