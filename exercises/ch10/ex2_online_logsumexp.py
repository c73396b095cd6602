"""Exercise 10.2: The online log-sum-exp

Chapter 10's cross-entropy never holds a whole row of logits: it walks along the row a block at a
time, keeping a running maximum m and a running sum l = sum_j exp(x_j - m), and rescales l by
exp(m - m') whenever a block raises the maximum to m'. At the end, logsumexp = m + log(l).

Write the Triton kernel `_logsumexp_kernel` and the function `logsumexp_rows(x, block=16)`:

- x: a float tensor [N, D] (float32 or float16, any D), contiguous. Entries may be -inf.
- Return a float32 tensor [N]: log(sum_j exp(x[r, j])) for every row, computed in float32.
- The kernel must loop over the row in blocks of `block` columns (a power of two, passed as a
  tl.constexpr) with the online recurrence, so that it never holds more than `block` values of a
  row: the tests use rows much longer than one block.
- Raise ValueError unless `block` is a power of two >= 1 and x is 2-D.

Grade it with `python -m looplm.grade ch10`.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _logsumexp_kernel(X, OUT, D, BLOCK: tl.constexpr):
    # your kernel: one row per program; loop `for start in range(0, D, BLOCK)`
    pass


def logsumexp_rows(x: torch.Tensor, block: int = 16) -> torch.Tensor:
    """log-sum-exp of each row of x [N, D], one block of columns at a time. -> float32 [N]"""
    raise NotImplementedError("Exercise 10.2: write logsumexp_rows and its kernel")
