"""Exercise 5.1: The exit distribution

Reference solution. See exercises/ch05/ex1_exit_distribution.py for the task.
"""

import torch


def exit_distribution(gate: torch.Tensor) -> torch.Tensor:
    """p(t | x) from the exit gates: gate [S, ...] -> [S, ...], summing to 1 over the steps."""
    if not isinstance(gate, torch.Tensor) or not gate.is_floating_point():
        raise ValueError(f"gate must be a floating-point tensor [S, ...], got "
                         f"{getattr(gate, 'dtype', type(gate).__name__)}")
    if gate.ndim < 1 or gate.shape[0] < 1:
        raise ValueError(f"gate must have a leading step dimension S >= 1, got shape {list(gate.shape)}")
    if not torch.isfinite(gate).all():
        raise ValueError("gate holds NaN or inf values")
    if (gate < 0).any() or (gate > 1).any():
        raise ValueError(f"gate values must lie in [0, 1], got min {gate.min().item():.4g} "
                         f"and max {gate.max().item():.4g}")
    survive = torch.cumprod(1 - gate[:-1], dim=0)                # r_1 .. r_{S-1}: (S-1, ...)
    reach = torch.cat([torch.ones_like(gate[:1]), survive])       # r_0 .. r_{S-1}: (S, ...)
    return torch.cat([gate[:-1] * reach[:-1], reach[-1:]])         # (S, ...)
