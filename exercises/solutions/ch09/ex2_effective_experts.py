"""Exercise 9.2: How many experts does each step use? (reference solution)."""

import torch


def effective_experts(load: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each row of load [S, E]; 0 for an all-zero row."""
    if load.ndim != 2 or (load < 0).any():
        raise ValueError(f"load must be [S, E] with entries >= 0, got shape {list(load.shape)}")
    terms = torch.where(load > 0, load * load.clamp_min(1e-300).log(), torch.zeros_like(load))
    out = torch.exp(-terms.sum(1))
    return torch.where(load.sum(1) > 0, out, torch.zeros_like(out))
