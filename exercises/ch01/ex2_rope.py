"""Exercise 1.2: Rotary position embeddings

Write the two functions of section 1.3 of chapter 1, in the "rotate half" layout.

`rope_angles(head_dim, max_seq_len, base)` returns the tables (cos, sin), each float32 of
shape [max_seq_len, head_dim // 2], with

    cos[m, i] = cos(m * theta_i),  sin[m, i] = sin(m * theta_i),  theta_i = base ** (-2 i / head_dim)

for positions m = 0 .. max_seq_len - 1 and pairs i = 0 .. head_dim/2 - 1.

`apply_rope(x, cos, sin)` rotates x of shape [B, n_heads, T, head_dim] (cos and sin are the
T rows for x's positions, shape [T, head_dim // 2]). Pair i is the point
(x[..., i], x[..., i + d/2]) of the plane, with d = head_dim, and the token in row m of the
tables is rotated counterclockwise by that row's angle m * theta_i. Return a tensor of x's
shape and dtype.

Grade it with `python -m looplm.grade ch01`, or run `pytest exercises/ch01/test_ex2_rope.py`.
"""

import torch


def rope_angles(head_dim: int, max_seq_len: int, base: float = 10000.0):
    """Return (cos, sin), each float32 [max_seq_len, head_dim // 2]."""
    raise NotImplementedError("Exercise 1.2: write rope_angles")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, nh, T, hs] pairwise (i, i + hs/2) by the angles in cos, sin [T, hs/2]."""
    raise NotImplementedError("Exercise 1.2: write apply_rope")
