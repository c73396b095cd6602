"""Exercise 9.1: The Switch loss, from its definition (reference solution)."""

import torch


def switch_loss(chosen: torch.Tensor, probs: torch.Tensor, n_experts: int) -> torch.Tensor:
    """E * sum_i f_i P_i for one router call."""
    if chosen.ndim != 2 or probs.ndim != 2 or chosen.shape[0] != probs.shape[0]:
        raise ValueError(f"chosen [N, k] and probs [N, E] must agree on N, got {list(chosen.shape)} and {list(probs.shape)}")
    if probs.shape[1] != n_experts:
        raise ValueError(f"probs must have n_experts={n_experts} columns, got {probs.shape[1]}")
    f = torch.bincount(chosen.reshape(-1), minlength=n_experts).to(probs.dtype) / chosen.numel()
    return n_experts * (f * probs.mean(0)).sum()
