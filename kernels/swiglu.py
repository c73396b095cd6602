# Generated from book/10_triton_kernels.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['SWIGLU_BLOCK', 'swiglu_reference', 'SwiGLUFunction', 'swiglu']
# fmt: on

import torch
import torch.nn.functional as F

from looplm.kernels.runtime import runs_in_triton, tl, triton

# --- book/10_triton_kernels.py:504 (cell 26) ---
SWIGLU_BLOCK = 1024          # numbers per program


def swiglu_reference(g, u):
    """silu(g) * u, as chapter 1's SwiGLU computes it."""
    return F.silu(g) * u


@triton.jit
def _swiglu_forward(G, U, Y, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offsets, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(G, U, DY, DG, DU, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DU + offsets, (dy * g * sig).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offsets, (dy * u * sig * (1 + g * (1 - sig))).to(DG.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        y = torch.empty_like(g)
        _swiglu_forward[(triton.cdiv(g.numel(), SWIGLU_BLOCK),)](g, u, y, g.numel(), BLOCK=SWIGLU_BLOCK)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _swiglu_backward[(triton.cdiv(g.numel(), SWIGLU_BLOCK),)](g, u, dy.contiguous(), dg, du, g.numel(),
                                                                  BLOCK=SWIGLU_BLOCK)
        return dg, du


def swiglu(g, u):
    """silu(g) * u for g, u of one shape and dtype, in one pass; differentiable in both."""
    if not isinstance(g, torch.Tensor) or not isinstance(u, torch.Tensor) or g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"g and u must be tensors of one shape and dtype, got {getattr(g, 'shape', g)} and "
                         f"{getattr(u, 'shape', u)}")
    return SwiGLUFunction.apply(g, u) if runs_in_triton(g, u) else swiglu_reference(g, u)
