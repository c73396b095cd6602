"""Exercise 1.1: RMSNorm

Write `rms_norm(x, weight, eps)`, the RMSNorm of section 1.2 of chapter 1 as a plain function.
Divide x by its root mean square over the last dimension, with eps added to the mean square
inside the square root, then multiply by the gain `weight`, coordinate by coordinate.

- x has any shape [..., d], weight has shape [d], and the result has x's shape and dtype.
- Compute in float32 even when x is float16 or bfloat16, then cast the result back to x's
  dtype. (In float16, squares of values above about 256 overflow to inf.)
- Do not subtract the mean (that would be LayerNorm) and do not add a bias.

Grade it with `python -m looplm.grade ch01`, or run
`pytest exercises/ch01/test_ex1_rmsnorm.py`.
"""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Return x / sqrt(mean(x**2, dim=-1) + eps) * weight, computed in float32, in x's dtype."""
    raise NotImplementedError("Exercise 1.1: write rms_norm")
