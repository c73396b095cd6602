"""Exercise 10.2: The online log-sum-exp (reference solution)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _logsumexp_kernel(X, OUT, D, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)      # per lane: running max and rescaled sum
    l = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(X + row * D + cols, mask=cols < D, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # a lane that has seen only -inf keeps l = 0 (exp(-inf - -inf) would be nan)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - safe) + tl.exp(x - safe)
        m = m_new
    # combine the lanes: the same recurrence, once, across them
    top = tl.max(m, axis=0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.where(m == float("-inf"), 0.0, l * tl.exp(m - safe_top)), axis=0)
    tl.store(OUT + row, safe_top + tl.log(total))


def logsumexp_rows(x: torch.Tensor, block: int = 16) -> torch.Tensor:
    """log-sum-exp of each row of x [N, D], one block of columns at a time. -> float32 [N]"""
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got {list(x.shape)}")
    if not isinstance(block, int) or block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 1, got {block!r}")
    x = x.contiguous()
    out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    _logsumexp_kernel[(x.shape[0],)](x, out, x.shape[1], BLOCK=block)
    return out
