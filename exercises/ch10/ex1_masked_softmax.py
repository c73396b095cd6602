"""Exercise 10.1: A masked row-wise softmax kernel

The Triton-Puzzles warm-up that every attention kernel builds on: a row-wise softmax where each
row only counts its first lengths[r] entries (the others are padding, as in a batch of prompts of
different lengths).

Write the Triton kernel `_masked_softmax_kernel` and the function `masked_softmax(x, lengths)`:

- x: a float tensor [N, D] (float32 or float16; any D, not only powers of two), contiguous.
- lengths: an integer tensor [N], each 1 <= lengths[r] <= D.
- Return y [N, D] in x's dtype: y[r, :L] = softmax(x[r, :L]) with L = lengths[r], computed in
  float32, and y[r, L:] = 0.
- Raise ValueError for a lengths entry outside [1, D] or a shape that does not match.
- One program per row is fine: BLOCK = triton.next_power_of_2(D) columns, masked.

Grade it with `python -m looplm.grade ch10`. Without a GPU the kernel runs in Triton's
interpreter (the graded tests set TRITON_INTERPRET=1 before importing this file).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _masked_softmax_kernel(X, LENGTHS, Y, D, BLOCK: tl.constexpr):
    # your kernel: one row per program, tl.program_id(0) is the row
    pass


def masked_softmax(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """softmax over the first lengths[r] entries of each row of x [N, D]; zeros after them."""
    raise NotImplementedError("Exercise 10.1: write masked_softmax and its kernel")
