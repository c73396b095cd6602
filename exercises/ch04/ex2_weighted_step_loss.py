"""Exercise 4.2: The weighted per-step loss

Write `weighted_loss(step_losses, targets, weights)`, the loss of section 4.1 of chapter 4:

    L_t = (1 / |M|) * sum over learned positions (b, i) in M of step_losses[t, b, i]
    loss = sum_t  w_t / (w_1 + ... + w_S) * L_t

- step_losses: float tensor [S, B, T] of per-token losses (as `LoopOutput.step_losses`).
- targets: integer tensor [B, T]; a position is learned when its target is not IGNORE_INDEX
  (`looplm.data.IGNORE_INDEX`, -100). Do not assume step_losses is 0 at the other positions:
  leave them out yourself.
- weights: a list or 1-D tensor of S non-negative numbers, or one of the names
  "last" (0, ..., 0, 1), "uniform" (1, ..., 1) and "linear" (1, 2, ..., S).
  The weights are normalised, so the loss is a weighted average of the L_t.
- Raise ValueError for weights of the wrong length, negative or non-finite weights, all-zero
  weights, an unknown name, or targets with no learned position.

Returns a scalar tensor that gradients flow through. Do not call
`looplm.backprop.weighted_step_loss`: the point is to write it. Grade it with
`python -m looplm.grade ch04`.
"""

import torch

from looplm.data import IGNORE_INDEX  # noqa: F401  (you will need it)


def weighted_loss(step_losses: torch.Tensor, targets: torch.Tensor, weights) -> torch.Tensor:
    """sum_t w_t L_t / sum_t w_t, L_t the mean of step_losses[t] over the learned positions."""
    raise NotImplementedError("Exercise 4.2: write weighted_loss")
