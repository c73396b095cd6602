"""Exercise 8.2: Back to Huginn's layout (reference solution)."""

import torch


def halves_to_pairs(rows: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows for rotate-half rope [n_heads * head_dim, ...] -> the rows for interleaved pairs."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if rows.shape[0] != n_heads * head_dim:
        raise ValueError(f"rows must have n_heads * head_dim = {n_heads * head_dim} rows, got {rows.shape[0]}")
    heads = rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:])       # the two halves of each head
    return heads.transpose(1, 2).reshape(rows.shape)                        # row 2i <- i, row 2i + 1 <- i + hs/2
