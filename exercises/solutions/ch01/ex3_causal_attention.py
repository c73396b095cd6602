"""Exercise 1.3: Causal attention by hand

Reference solution. See exercises/ch01/ex3_causal_attention.py for the task.
"""

import math

import torch


def causal_mask(t_q: int, t_k: int) -> torch.Tensor:
    """Additive mask [t_q, t_k]: 0 where query i sees key j (j <= i + t_k - t_q), -inf elsewhere."""
    # -inf strictly above the diagonal shifted right by t_k - t_q, 0 on and below it
    return torch.full((t_q, t_k), float("-inf")).triu(diagonal=t_k - t_q + 1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hs) + causal_mask) v for q [B, nh, t_q, hs], k, v [B, nh, t_k, hs]."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])     # (B, nh, t_q, t_k)
    scores = scores + causal_mask(q.shape[-2], k.shape[-2]).to(scores)
    return scores.softmax(dim=-1) @ v                               # (B, nh, t_q, hs)
