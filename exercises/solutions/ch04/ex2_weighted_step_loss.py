"""Exercise 4.2: The weighted per-step loss

Reference solution. See exercises/ch04/ex2_weighted_step_loss.py for the task.
"""

import torch

from looplm.data import IGNORE_INDEX


def weighted_loss(step_losses: torch.Tensor, targets: torch.Tensor, weights) -> torch.Tensor:
    """sum_t w_t L_t / sum_t w_t, L_t the mean of step_losses[t] over the learned positions."""
    S = step_losses.shape[0]
    if isinstance(weights, str):
        named = {"last": [0.0] * (S - 1) + [1.0], "uniform": [1.0] * S,
                 "linear": [float(t) for t in range(1, S + 1)]}
        if weights not in named:
            raise ValueError(f"unknown weight scheme {weights!r}; use 'last', 'uniform' or 'linear'")
        weights = named[weights]
    w = torch.as_tensor(weights, dtype=step_losses.dtype, device=step_losses.device)
    if w.ndim != 1 or w.shape[0] != S:
        raise ValueError(f"need one weight per step ({S}), got shape {list(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() == 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    learned = targets != IGNORE_INDEX                              # (B, T)
    if not learned.any():
        raise ValueError("targets has no learned position")
    per_step = step_losses[:, learned].mean(dim=1)                 # (S,)
    return (w * per_step).sum() / w.sum()
