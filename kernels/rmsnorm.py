# Generated from book/10_triton_kernels.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['add_rmsnorm_reference', 'AddRMSNormFunction', 'add_rmsnorm']
# fmt: on

import torch

from looplm.kernels.runtime import row_tiles, runs_in_triton, tl, triton

# --- book/10_triton_kernels.py:275 (cell 13) ---
def add_rmsnorm_reference(h, inj, weight, eps):
    """(u, RMSNorm(u) * weight) with u = h + inj (u = h when inj is None), as chapter 1 computes
    it: the sum in h's dtype, the norm in float32 (float64 for float64), the result in h's dtype."""
    u = h if inj is None else h + inj
    wide = u.to(torch.promote_types(u.dtype, torch.float32))
    y = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return u, (y * weight.to(wide.dtype)).to(u.dtype)

# --- book/10_triton_kernels.py:295 (cell 15) ---
@triton.jit
def _add_rmsnorm_forward(H, INJ, W, U, Y, RSTD, n_rows, D, eps,
                         HAS_INJ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    offsets = rows[:, None] * D + cols[None, :]                       # (BLOCK_M, BLOCK_D)
    u = tl.load(H + offsets, mask=mask, other=0.0)
    if HAS_INJ:
        u = u + tl.load(INJ + offsets, mask=mask, other=0.0)          # in the input dtype, as torch adds
        tl.store(U + offsets, u, mask=mask)
    x = u.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)            # (BLOCK_M,); padding adds 0
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(Y + offsets, (x * rstd[:, None] * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)

# --- book/10_triton_kernels.py:328 (cell 17) ---
@triton.jit
def _add_rmsnorm_backward(DY, DU, U, W, RSTD, DX, DW_PARTS, n_rows, D,
                          HAS_DU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    offsets = rows[:, None] * D + cols[None, :]
    x = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    xhat = x * rstd[:, None]
    wdy = w[None, :] * dy
    mean = tl.sum(xhat * wdy, axis=1) / D                            # (BLOCK_M,)
    dx = (wdy - xhat * mean[:, None]) * rstd[:, None]
    if HAS_DU:
        dx += tl.load(DU + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTS + pid * D + cols, tl.sum(dy * xhat, axis=0), mask=cols < D)   # stage one


@triton.jit
def _sum_columns(X, OUT, n_rows, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[c] = sum over r of X[r, c], for this program's BLOCK_D columns (stage two)."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
        total += tl.sum(tl.load(X + rows[:, None] * D + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(OUT + cols, total.to(OUT.dtype.element_ty), mask=cols < D)

# --- book/10_triton_kernels.py:369 (cell 19) ---
class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, inj, weight, eps):
        D = h.shape[-1]
        h2 = h.contiguous().view(-1, D)
        n = h2.shape[0]
        u = h2 if inj is None else torch.empty_like(h2)
        y, rstd = torch.empty_like(h2), torch.empty(n, device=h.device, dtype=torch.float32)
        block_m, block_d, warps = row_tiles(D)
        _add_rmsnorm_forward[(triton.cdiv(n, block_m),)](
            h2, h2 if inj is None else inj.contiguous().view(-1, D), weight, u, y, rstd, n, D, eps,
            HAS_INJ=inj is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
        ctx.save_for_backward(u, weight, rstd)
        ctx.shape, ctx.has_inj = h.shape, inj is not None
        return u.view(h.shape), y.view(h.shape)

    @staticmethod
    def backward(ctx, du, dy):
        u, weight, rstd = ctx.saved_tensors
        n, D = u.shape
        block_m, block_d, warps = row_tiles(D)
        n_programs = triton.cdiv(n, block_m)
        dy = torch.zeros_like(u) if dy is None else dy.contiguous().view(n, D)
        dx = torch.empty_like(u)
        parts = torch.empty(n_programs, D, device=u.device, dtype=torch.float32)
        _add_rmsnorm_backward[(n_programs,)](
            dy, dy if du is None else du.contiguous().view(n, D), u, weight, rstd, dx, parts, n, D,
            HAS_DU=du is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
        dw = torch.empty(D, device=u.device, dtype=weight.dtype)
        _sum_columns[(triton.cdiv(D, 64),)](parts, dw, n_programs, D, BLOCK_M=32, BLOCK_D=64)
        dx = dx.view(ctx.shape)
        return dx, (dx if ctx.has_inj else None), dw, None


def add_rmsnorm(h, inj, weight, eps):
    """(u, y) = (h + inj, RMSNorm(h + inj) * weight) in one pass; inj=None normalises h itself
    (then u is h). h, inj [..., D]; weight [D]. Differentiable in h, inj and weight."""
    if inj is not None and (inj.shape != h.shape or inj.dtype != h.dtype):
        raise ValueError(f"inj must have h's shape {list(h.shape)} and dtype {h.dtype}, got "
                         f"{list(inj.shape)} {inj.dtype}")
    if weight.shape != h.shape[-1:]:
        raise ValueError(f"weight must have shape [{h.shape[-1]}], got {list(weight.shape)}")
    if not runs_in_triton(h, weight):
        return add_rmsnorm_reference(h, inj, weight, eps)
    u, y = AddRMSNormFunction.apply(h, inj, weight, eps)
    return (h if inj is None else u), y
