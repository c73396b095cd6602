# Generated from book/10_triton_kernels.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['masked_update_reference', 'masked_update']
# fmt: on

import torch

from looplm.kernels.runtime import row_tiles, runs_in_triton, tl, triton

# --- book/10_triton_kernels.py:185 (cell 6) ---
def masked_update_reference(h, x, delta, active):
    """where(active, x + delta, h), row by row: h, x, delta [..., D]; active [...] bool."""
    return torch.where(active[..., None], x + delta, h)

# --- book/10_triton_kernels.py:201 (cell 8) ---
@triton.jit
def _masked_update_kernel(H, X, DELTA, ACTIVE, OUT, n_rows, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)            # (BLOCK_M,) this program's rows
    cols = tl.arange(0, BLOCK_D)                                          # (BLOCK_D,)
    in_rows = rows < n_rows
    active = tl.load(ACTIVE + rows, mask=in_rows, other=0) != 0           # (BLOCK_M,)
    mask = in_rows[:, None] & (cols[None, :] < D)                         # (BLOCK_M, BLOCK_D)
    offsets = rows[:, None] * D + cols[None, :]
    run = mask & active[:, None]
    new = tl.load(X + offsets, mask=run, other=0.0) + tl.load(DELTA + offsets, mask=run, other=0.0)
    old = tl.load(H + offsets, mask=mask & ~active[:, None], other=0.0)
    tl.store(OUT + offsets, tl.where(active[:, None], new, old), mask=mask)


def masked_update(h, x, delta, active):
    """where(active, x + delta, h) for h, x, delta [..., D] and active [...] (bool), in one pass.

    For decoding: with gradients required it is the torch reference (two `where`s are its whole
    backward). Inputs a kernel cannot take (see runs_in_triton) also go to the reference."""
    if not (h.shape == x.shape == delta.shape and h.dtype == x.dtype == delta.dtype):
        raise ValueError(f"h, x and delta must have one shape and dtype, got {list(h.shape)} {h.dtype}, "
                         f"{list(x.shape)} {x.dtype}, {list(delta.shape)} {delta.dtype}")
    if active.dtype != torch.bool or active.shape != h.shape[:-1]:
        raise ValueError(f"active must be a bool tensor of shape {list(h.shape[:-1])}, got "
                         f"{active.dtype} {list(active.shape)}")
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or x.requires_grad or delta.requires_grad)
    if needs_grad or not runs_in_triton(h, x, delta):
        return masked_update_reference(h, x, delta, active)
    D = h.shape[-1]
    h2, x2, d2 = (t.contiguous().view(-1, D) for t in (h, x, delta))
    out = torch.empty_like(h2)
    block_m, block_d, warps = row_tiles(D)
    grid = (triton.cdiv(h2.shape[0], block_m),)
    _masked_update_kernel[grid](h2, x2, d2, active.contiguous().view(-1), out, h2.shape[0], D,
                                BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return out.view(h.shape)
