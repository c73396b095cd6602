"""Exercise 10.3: The backward pass of GeGLU, as a kernel (reference solution).

With a = c (g + k g^3) and t = tanh(a): gelu(g) = 0.5 g (1 + t), and
d gelu / dg = 0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 k g^2). Then du = dy gelu(g) and
dg = dy u (d gelu / dg).
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _geglu_backward_kernel(G, U, DY, DG, DU, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    c, k = 0.7978845608028654, 0.044715
    t = 2 * tl.sigmoid(2 * c * (g + k * g * g * g)) - 1              # tanh(a)
    gelu = 0.5 * g * (1 + t)
    slope = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * c * (1 + 3 * k * g * g)
    tl.store(DU + offsets, (dy * gelu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offsets, (dy * u * slope).to(DG.dtype.element_ty), mask=mask)


def geglu_backward(g: torch.Tensor, u: torch.Tensor, dy: torch.Tensor):
    """(dg, du) for y = gelu_tanh(g) * u and upstream gradient dy."""
    if not (g.shape == u.shape == dy.shape and g.dtype == u.dtype == dy.dtype):
        raise ValueError("g, u and dy must have one shape and dtype")
    g, u, dy = g.contiguous(), u.contiguous(), dy.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    _geglu_backward_kernel[(triton.cdiv(g.numel(), BLOCK),)](g, u, dy, dg, du, g.numel(), BLOCK=BLOCK)
    return dg, du
