"""Exercise 1.1: RMSNorm

Reference solution. See exercises/ch01/ex1_rmsnorm.py for the task.
"""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Return x / sqrt(mean(x**2, dim=-1) + eps) * weight, computed in float32, in x's dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)
