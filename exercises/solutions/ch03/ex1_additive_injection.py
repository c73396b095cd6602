"""Exercise 3.1: Additive injection

Reference solution. See exercises/ch03/ex1_additive_injection.py for the task.
"""

import torch
from torch import nn


class AdditiveInjection(nn.Module):
    """inject(h, x0) = h + x0 / sqrt(mean(x0**2) + eps) * weight, weight [d_model] starting at 1."""

    def __init__(self, config):
        super().__init__()
        self.eps = config.eps
        self.weight = nn.Parameter(torch.ones(config.d_model))

    def forward(self, h: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        x = x0.float()
        normed = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight.float()
        return (h.float() + normed).to(h.dtype)                 # (B, T, D)
