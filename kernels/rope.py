# Generated from book/10_triton_kernels.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['RopeFunction', 'rope']
# fmt: on

import torch

from looplm.block import apply_rope
from looplm.kernels.runtime import next_power_of_2, runs_in_triton, tl, triton

# --- book/10_triton_kernels.py:612 (cell 31) ---
@triton.jit
def _rope_kernel(X, COS, SIN, Y, n_rows, n_heads, T, half, stride_xb, stride_xh, stride_xt, stride_cb,
                 SIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """BLOCK_R rows (b, head, t) of x: y1 = x1 cos - SIGN x2 sin, y2 = x2 cos + SIGN x1 sin."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)                    # row r = (b * H + head) * T + t
    b, head, t = r // (n_heads * T), (r // T) % n_heads, r % T
    i = tl.arange(0, BLOCK_H)
    mask = (r[:, None] < n_rows) & (i[None, :] < half)
    x_at = X + (b * stride_xb + head * stride_xh + t * stride_xt)[:, None] + i[None, :]
    x1 = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + half, mask=mask, other=0.0).to(tl.float32)
    table_at = (b * stride_cb + t * half)[:, None] + i[None, :]
    cos = tl.load(COS + table_at, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + table_at, mask=mask, other=0.0).to(tl.float32) * SIGN
    y_at = Y + r[:, None] * (2 * half) + i[None, :]                            # Y is contiguous
    tl.store(y_at, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_at + half, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


def _rotate(x, cos, sin, sign):
    B, H, T, hs = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(B, H, T, hs, device=x.device, dtype=x.dtype)
    n_rows = B * H * T
    block_h = next_power_of_2(hs // 2)
    block_r = max(1, min(128, 4096 // block_h))
    _rope_kernel[(triton.cdiv(n_rows, block_r),)](
        x, cos, sin, y, n_rows, H, T, hs // 2, x.stride(0), x.stride(1), x.stride(2),
        0 if cos.ndim == 2 else cos.stride(0), SIGN=sign, BLOCK_R=block_r, BLOCK_H=block_h)
    return y


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, -1), None, None


def rope(x, cos, sin):
    """apply_rope(x, cos, sin) (chapter 1) as one kernel: x [B, n_heads, T, head_dim]; cos, sin
    [T, head_dim // 2], or [B, T, head_dim // 2] for one table per row. Differentiable in x."""
    if not runs_in_triton(x):
        return apply_rope(x, cos, sin)                 # also the one that explains bad shapes
    if (x.ndim != 4 or cos.shape != sin.shape or cos.shape[-1] * 2 != x.shape[-1] or cos.shape[-2] != x.shape[-2]
            or cos.ndim not in (2, 3) or (cos.ndim == 3 and cos.shape[0] != x.shape[0])):
        return apply_rope(x, cos, sin)
    # the tables in x's dtype, as apply_rope rounds them
    return RopeFunction.apply(x, cos.to(x.dtype).contiguous(), sin.to(x.dtype).contiguous())
