"""Exercise 6.1: ACT's halting weights (reference solution)."""

import math

import torch


def act_halting(gate: torch.Tensor, eps: float = 0.01):
    """ACT's weights [S, ...], halting step N [...] (from 1) and remainder R [...] from the gates."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not 0 <= eps < 1:
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")
    if not isinstance(gate, torch.Tensor) or not gate.is_floating_point() or gate.ndim < 1 or gate.shape[0] < 1:
        raise ValueError("gate must be a floating-point tensor [S, ...] with at least one step")
    if ((gate < 0) | (gate > 1)).any():
        raise ValueError("gate values must lie in [0, 1]")
    S = gate.shape[0]
    spent = gate.cumsum(0)                                          # h_1 + ... + h_n: (S, ...)
    halted = spent >= 1 - eps
    halted[-1] = True                                               # N = S when the budget is never spent
    n_halt = halted.long().argmax(0) + 1                            # the first halted step, from 1
    steps = torch.arange(1, S + 1, device=gate.device).view(S, *[1] * (gate.ndim - 1))
    before = steps < n_halt
    remainder = 1 - torch.where(before, gate, torch.zeros_like(gate)).sum(0)
    weights = torch.where(before, gate, torch.zeros_like(gate)) + (steps == n_halt).to(gate.dtype) * remainder
    return weights, n_halt, remainder
