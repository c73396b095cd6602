"""Exercise 10.1: A masked row-wise softmax kernel (reference solution)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _masked_softmax_kernel(X, LENGTHS, Y, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    length = tl.load(LENGTHS + row)
    keep = cols < length                                   # the row's real entries (length <= D)
    x = tl.load(X + row * D + cols, mask=keep, other=float("-inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))                      # exp(-inf) = 0 on the padding
    tl.store(Y + row * D + cols, (e / tl.sum(e, axis=0)).to(Y.dtype.element_ty), mask=cols < D)


def masked_softmax(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """softmax over the first lengths[r] entries of each row of x [N, D]; zeros after them."""
    if x.ndim != 2 or lengths.shape != (x.shape[0],):
        raise ValueError(f"x must be [N, D] and lengths [N], got {list(x.shape)} and {list(lengths.shape)}")
    N, D = x.shape
    if ((lengths < 1) | (lengths > D)).any():
        raise ValueError(f"every length must be in [1, D={D}], got {lengths.tolist()}")
    x = x.contiguous()
    y = torch.empty_like(x)
    _masked_softmax_kernel[(N,)](x, lengths.to(torch.int32).contiguous(), y, D, BLOCK=triton.next_power_of_2(D))
    return y
