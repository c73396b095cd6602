"""Exercise 5.4: Where Stage I sends the exit mass

Reference solution. See exercises/ch05/ex4_stage1_optimum.py for the task.
"""

import math

import torch


def _check_losses(step_losses):
    if not isinstance(step_losses, torch.Tensor) or not step_losses.is_floating_point() or step_losses.ndim < 1:
        raise ValueError("step_losses must be a floating-point tensor [S, ...]")
    if step_losses.shape[0] < 1 or not torch.isfinite(step_losses).all():
        raise ValueError("step_losses needs at least one step and finite values")


def _check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def stage1_optimum(step_losses, beta):
    """The exit distribution p [S, ...] that minimises Σ_t p_t L_t − β H(p) for fixed losses."""
    _check_losses(step_losses)
    if _check_number("beta", beta) <= 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    # Lagrange: L_t + β (log p_t + 1) = μ for every t, so p_t ∝ exp(−L_t / β)
    return torch.softmax(-step_losses / beta, dim=0)


def _entropy(p):
    return -(p * p.clamp_min(1e-300).log()).sum().item()


def beta_for_entropy(step_losses, entropy):
    """The β > 0 whose Stage I optimum for one token's losses [S] has entropy H(p) = entropy."""
    _check_losses(step_losses)
    if step_losses.ndim != 1:
        raise ValueError(f"step_losses must be one token's losses [S], got shape {list(step_losses.shape)}")
    entropy = _check_number("entropy", entropy)
    losses = step_losses.double()
    ties = int((losses == losses.min()).sum())
    # H grows with β: from log(ties) (all mass on the best steps) to log S (uniform)
    low_h, high_h = math.log(ties), math.log(losses.shape[0])
    if not low_h < entropy < high_h:
        raise ValueError(f"no beta > 0 gives entropy {entropy}: it lies in ({low_h:.6g}, {high_h:.6g}) "
                         f"for these losses")
    low, high = 1e-3, 1.0
    while _entropy(stage1_optimum(losses, low)) > entropy:
        low /= 2
    while _entropy(stage1_optimum(losses, high)) < entropy:
        high *= 2
    for _ in range(200):                                  # bisection on log β
        mid = math.sqrt(low * high)
        if _entropy(stage1_optimum(losses, mid)) < entropy:
            low = mid
        else:
            high = mid
        if high / low - 1 < 1e-15:
            break
    return math.sqrt(low * high)
