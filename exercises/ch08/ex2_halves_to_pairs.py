"""Exercise 8.2: Back to Huginn's layout

Chapter 8's `looplm.convert.pairs_to_halves(rows, n_heads, head_dim)` reorders the rows of a query
or key projection within each head, so that rotary pairs (2i, 2i + 1) (Huginn's convention)
become pairs (i, i + head_dim / 2) (looplm's): new row j of a head is old row perm[j], with
perm = (0, 2, 4, ..., head_dim - 2, 1, 3, ..., head_dim - 1).

Write its inverse, `halves_to_pairs(rows, n_heads, head_dim)`:

- rows: a tensor [n_heads * head_dim, ...] (a weight, or a flattened bias).
- Return a NEW tensor of the same shape, with each head's rows put back in Huginn's order, so
  that halves_to_pairs(pairs_to_halves(w, H, hs), H, hs) equals w.
- Raise ValueError if head_dim is odd or rows.shape[0] != n_heads * head_dim.

Grade it with `python -m looplm.grade ch08`.
"""

import torch


def halves_to_pairs(rows: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows for rotate-half rope [n_heads * head_dim, ...] -> the rows for interleaved pairs."""
    raise NotImplementedError("Exercise 8.2: write halves_to_pairs")
