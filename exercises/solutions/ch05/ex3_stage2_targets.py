"""Exercise 5.3: The Stage II targets and gate loss

Reference solution. See exercises/ch05/ex3_stage2_targets.py for the task.
"""

import math

import torch


def _check_float_steps(name, x):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError(f"{name} must be a floating-point tensor [S, ...], got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")


def stage2_gate_loss(step_losses: torch.Tensor, gate: torch.Tensor, k: float = 50.0,
                     gamma: float = 0.005, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Ouro's Stage II gate loss: BCE of "continue" = 1 - λ_{t-1} against w_t, over t = 2..S, / S."""
    _check_float_steps("step_losses", step_losses)
    _check_float_steps("gate", gate)
    if step_losses.shape != gate.shape:
        raise ValueError(f"step_losses {list(step_losses.shape)} and gate {list(gate.shape)} "
                         f"must have the same shape [S, ...]")
    n_steps = gate.shape[0]
    if n_steps < 2:
        raise ValueError(f"stage II needs at least 2 steps, got S={n_steps}")
    if not torch.isfinite(gate).all() or (gate < 0).any() or (gate > 1).any():
        raise ValueError("gate values must be finite and lie in [0, 1]")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
        raise ValueError(f"k must be a number > 0, got {k!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")
    if mask is None:
        mask = torch.ones(gate.shape[1:], dtype=torch.bool, device=gate.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != gate.shape[1:]:
        raise ValueError(f"mask must be a bool tensor of the token shape {list(gate.shape[1:])}")
    count = mask.sum()
    if count == 0:
        raise ValueError("mask selects no token")

    dtype = torch.promote_types(gate.dtype, torch.float32)
    losses = step_losses.detach().to(dtype)
    improvement = (losses[:-1] - losses[1:]).clamp_min(0)         # I_t, t = 2..S: (S-1, ...)
    targets = torch.sigmoid(k * (improvement - gamma))            # w_t: (S-1, ...)
    stop = gate[:-1].to(dtype)                                    # λ_{t-1}: (S-1, ...)
    log_continue = torch.log(1 - stop).clamp_min(-100)
    log_stop = torch.log(stop).clamp_min(-100)
    bce = -(targets * log_continue + (1 - targets) * log_stop)     # (S-1, ...)
    bce = torch.where(mask, bce, torch.zeros_like(bce))           # masked tokens count 0
    per_step = bce.flatten(1).sum(1) / count                      # mean over tokens: (S-1,)
    return per_step.sum() / n_steps
