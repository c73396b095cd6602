"""Exercise 9.3: Bias balancing with gradient accumulation (reference solution)."""

import torch


def accumulated_bias(counts: torch.Tensor, gamma: float, forwards_per_update: int) -> torch.Tensor:
    """The bias [E] after the updates of DeepSeek-V3's balancing, once per optimizer step."""
    if counts.ndim != 3 or counts.shape[0] % forwards_per_update:
        raise ValueError("counts must be [F, S, E] with F a multiple of forwards_per_update")
    bias = torch.zeros(counts.shape[2], dtype=counts.dtype)
    for start in range(0, counts.shape[0], forwards_per_update):
        c = counts[start:start + forwards_per_update].sum((0, 1))       # every forward and step at once
        bias += gamma * torch.sign(c.mean() - c)
    return bias
