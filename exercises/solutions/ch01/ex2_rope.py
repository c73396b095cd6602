"""Exercise 1.2: Rotary position embeddings

Reference solution. See exercises/ch01/ex2_rope.py for the task.
"""

import torch


def rope_angles(head_dim: int, max_seq_len: int, base: float = 10000.0):
    """Return (cos, sin), each float32 [max_seq_len, head_dim // 2]."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)      # (T, hs/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, nh, T, hs] pairwise (i, i + hs/2) by the angles in cos, sin [T, hs/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]          # (B, nh, T, hs/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
