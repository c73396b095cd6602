# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 10: Triton kernels for the loop
#
# A looped model runs the same block $S$ times, and so it pays some costs $S$ times that a
# stacked model pays once. Every step ends in a readout: an LM head over the whole vocabulary and
# a cross-entropy, so that training holds $S$ logit tensors of $N \times V$ numbers at once. Every
# step starts with the injection $h + \mathrm{RMSNorm}(x_0)$ and a norm on its result, two passes
# over memory where one would do. And under per-token early exit, every step ends with a masked
# update that keeps the exited tokens' states. None of these is arithmetic-heavy: they are
# limited by how many bytes they move, and a GPU moves bytes far more slowly than it multiplies.
#
# A **kernel** is one function that runs on the GPU, launched over a grid of programs. PyTorch
# launches one per operation and writes each result to memory for the next one to read back.
# **Triton** {cite:p}`tillet2019triton` lets us write our own kernels in Python, at the level of
# blocks of a tensor rather than single threads, and so fuse several operations into one pass.
# This chapter writes the kernels that remove the loop's per-step costs, in the order of the
# official Triton tutorials (element-wise, row-wise with a reduction, forward and backward with a
# two-stage weight gradient, a matrix product with an online softmax), and with the lessons of
# Liger-Kernel {cite:p}`hsu2024liger` and Cut Cross-Entropy {cite:p}`wijmans2025cce`.
#
# Every kernel gets four beats: a torch reference, the kernel, a test against the reference, and
# a benchmark. On a machine without a GPU, Triton's **interpreter** (`TRITON_INTERPRET=1`) runs
# the same kernels on the CPU with numpy, one program at a time: slowly, but exactly the code a
# GPU would run. That is how this chapter runs on a laptop, and how its tests run in CI.

# %% [markdown]
# The plan:
#
# 1. Triton's model in one page, and a first kernel: the masked state update;
# 2. RMSNorm fused with the loop's injection, forward and backward, with the two-stage reduction
#    of the weight's gradient;
# 3. SwiGLU, an element-wise kernel with its backward pass;
# 4. rotary embeddings, whose backward is the inverse rotation;
# 5. causal flash attention, forward and backward;
# 6. the multi-exit linear cross-entropy: the losses of all $S$ readouts without their logits;
# 7. the switch `LoopLMConfig(kernels="triton")`: which ops run as kernels, and a convergence test;
# 8. `python -m looplm.bench kernels`, and what decoding should do with exited tokens.
#
# The kernels go to `kernels/` (installed as `looplm.kernels`), one module per kernel, and the
# switch to `kernels/loop.py`; Appendix C's part *inside the kernels* adds the backward passes,
# the launch code, the tests and the benchmark (`looplm/bench.py`).

# %% tags=["hide-input"]
import os

import torch

if not torch.cuda.is_available():
    # no GPU: Triton's interpreter runs the kernels on the CPU. It must be set before triton is
    # imported, and it is read when a kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch.nn.functional as F

import looplm
from looplm.block import apply_rope, rope_angles
from looplm.testing import run_tests

torch.set_num_threads(1)
_ = torch.manual_seed(0)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print("torch", torch.__version__, "| looplm", looplm.__version__, "| device", DEVICE,
      "| TRITON_INTERPRET =", os.environ.get("TRITON_INTERPRET"))

# %% [markdown]
# ## 10.1 Triton in one page, and the masked state update
#
# A Triton kernel is a Python function under `@triton.jit`. It is launched as
# `kernel[grid](arguments…)`, which runs one **program** for every point of the grid, in parallel
# and in no particular order. A program knows its place from `tl.program_id(axis)` and works on a
# **block**: a small tensor of offsets such as `tl.arange(0, BLOCK)`, whose size is a power of two
# known at compile time (`tl.constexpr`). It reads with `tl.load(pointer + offsets, mask=…)` and
# writes with `tl.store`; the mask switches off the lanes past the end of the data, which is how a
# kernel handles sizes that are not powers of two. Between the load and the store the block lives
# in registers, and everything done there costs no memory traffic. That is the whole trick of
# fusion.
#
# Triton is optional for `looplm`: it has no wheels for macOS or Windows, and `import looplm` must
# work there. So the kernels import it through a small module that stands in for it when it is
# missing, and one function decides whether a set of tensors can go to a kernel at all: CUDA
# tensors can; CPU tensors can when the interpreter is on, except in bfloat16, whose arithmetic
# the interpreter gets wrong; float64 never does (the kernels are written for the types a GPU
# trains in, and the torch references serve float64).

# %%
#| export kernels.runtime
import os

import torch

# read once, as triton itself reads it when a kernel is defined
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:                  # macOS, Windows, or not installed: the kernels' modules still import
    HAS_TRITON = False

    class _Launch:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(f"{self.fn.__name__} is a Triton kernel, and Triton is not installed "
                               "(pip install triton; Linux only)")

    class _NoTriton:
        """Stands in for `triton` and `triton.language`: @jit wraps a kernel whose launch raises,
        and any other name (tl.constexpr in a signature) is None."""

        def jit(self, fn=None, **options):
            return _Launch(fn) if fn is not None else _Launch

        def __getattr__(self, name):
            return None

    triton = tl = _NoTriton()

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def runs_in_triton(*tensors):
    """True when all `tensors` can go to a Triton kernel here: Triton is installed, the dtype is
    float16, bfloat16 or float32, and the tensor is on a GPU, or on the CPU with the interpreter
    on (TRITON_INTERPRET=1) and not in bfloat16, which the interpreter computes wrongly."""
    if not HAS_TRITON:
        return False
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            return False
        if t.device.type == "cuda":
            continue
        if t.device.type != "cpu" or not INTERPRET or t.dtype == torch.bfloat16:
            return False
    return True


def next_power_of_2(n):
    """The smallest power of two >= n (>= 1): block sizes must be powers of two."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def row_tiles(d, max_elements=4096):
    """(rows per program, padded row width, warps) for a row-wise kernel over rows of d numbers:
    one wide row per program on a GPU-sized row, several short rows per program otherwise, so
    that no program holds more than `max_elements` numbers (and the interpreter, which pays per
    program, runs few of them)."""
    block_d = next_power_of_2(d)
    block_m = max(1, min(32, max_elements // block_d))
    return block_m, block_d, min(16, max(1, block_m * block_d // 512))

# %% [markdown]
# The first kernel is the simplest the loop needs. Under per-token early exit (chapter 7), a token
# that has exited keeps its state while the others run on: $h \leftarrow \mathrm{where}(a, h', h)$
# for a boolean $a$ per token. In a pre-norm block the step's last operation is the residual add
# $h' = x + \mathrm{MLP}(\cdot)$, so we fuse the two: one pass reads $x$ and the MLP's output for
# the rows that run, $h$ for the rows that have exited, and writes one state. The torch reference
# is one line:

# %%
#| export kernels.update
import torch

from looplm.kernels.runtime import row_tiles, runs_in_triton, tl, triton


def masked_update_reference(h, x, delta, active):
    """where(active, x + delta, h), row by row: h, x, delta [..., D]; active [...] bool."""
    return torch.where(active[..., None], x + delta, h)

# %% [markdown]
# The kernel gives each program `BLOCK_M` rows of `BLOCK_D` numbers (the row width padded to a
# power of two). Two masks are at work: `mask` switches off the padding and the rows past the end,
# and `run` also switches off the exited rows, whose new values are never read:

# %%
#| export kernels.update
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

# %% [markdown]
# The test compares it with the reference on shapes that are not powers of two, with some rows
# exited, in both dtypes the interpreter computes correctly. An exited row must come back bit for
# bit, and a running row too here: the kernel adds in the input dtype, as torch does.

# %%
from looplm.kernels.update import masked_update, masked_update_reference

for dtype in (torch.float32, torch.float16):
    h, x, delta = (torch.randn(5, 3, 37).to(dtype) for _ in range(3))
    active = torch.rand(5, 3) < 0.6
    out = masked_update(h, x, delta, active)
    print(f"{str(dtype):14s} exited rows unchanged: {torch.equal(out[~active], h[~active])}, "
          f"running rows max |error|: {(out - masked_update_reference(h, x, delta, active)).abs().max():.1e}")

# %% [markdown]
# Its benchmark belongs with decoding, in section 10.8: whether a decoder should compute every row
# and mask, as this kernel does, or drop the exited rows from the batch, as chapter 7's does.

# %% [markdown]
# ## 10.2 RMSNorm fused with the injection
#
# With `injection="add"` every step begins $u = h + \mathrm{RMSNorm}_{\text{inj}}(x_0)$, and the
# pre-norm block's first operation is $\mathrm{RMSNorm}_1(u)$. In torch that is an add that reads
# two tensors and writes one, then a norm that reads it back and writes another. Fused, one pass
# reads $h$ and the injection and writes both $u$ (the block needs it for its residual) and the
# normed $y$:
#
# $$u = h + j, \qquad r = \Big(\tfrac{1}{D}\textstyle\sum_i u_i^2 + \epsilon\Big)^{-1/2}, \qquad y_i = w_i\, r\, u_i .$$
#
# The injection itself, $\mathrm{RMSNorm}_{\text{inj}}(x_0)$, is the same at every step, so the
# kernel path computes it once per forward instead of $S$ times. The same fused op serves the
# block's second norm, $x + \mathrm{Attn}(\cdot)$ followed by $\mathrm{RMSNorm}_2$. The reference
# follows chapter 1's `RMSNorm`: the sum in the input dtype, the norm in float32.

# %%
#| export kernels.rmsnorm
import torch

from looplm.kernels.runtime import row_tiles, runs_in_triton, tl, triton


def add_rmsnorm_reference(h, inj, weight, eps):
    """(u, RMSNorm(u) * weight) with u = h + inj (u = h when inj is None), as chapter 1 computes
    it: the sum in h's dtype, the norm in float32 (float64 for float64), the result in h's dtype."""
    u = h if inj is None else h + inj
    wide = u.to(torch.promote_types(u.dtype, torch.float32))
    y = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return u, (y * weight.to(wide.dtype)).to(u.dtype)

# %% [markdown]
# The forward kernel is row-wise: each program takes `BLOCK_M` whole rows, so the mean over a row
# is a `tl.sum` inside the program. It also stores $r$ per row, one float for every $D$ numbers,
# which saves the backward from recomputing it.

# %%
#| export kernels.rmsnorm
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

# %% [markdown]
# The backward needs three gradients. With $\hat u = r u$ and an upstream gradient $g$ for $y$
# (and $g_u$ for $u$, which the residual path sends back), the chain rule through the mean gives
#
# $$\frac{\partial L}{\partial u} = r\Big(w \odot g - \hat u\, \tfrac{1}{D}\textstyle\sum_i \hat u_i w_i g_i\Big) + g_u,
# \qquad \frac{\partial L}{\partial h} = \frac{\partial L}{\partial j} = \frac{\partial L}{\partial u},
# \qquad \frac{\partial L}{\partial w} = \sum_{\text{rows}} g \odot \hat u .$$
#
# The first two are row-wise like the forward. The weight's gradient is a sum over *all* rows, so
# the programs must combine their results. The layer-norm tutorial's answer is a **two-stage
# reduction**: each program writes the sum over its own rows to a row of a small float32 buffer
# (stage one), and a second kernel sums that buffer's columns (stage two). No two programs write
# the same address, so there are no atomics and the result is deterministic.

# %%
#| export kernels.rmsnorm
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

# %% [markdown]
# An `autograd.Function` ties the two together. Its `forward` launches the kernel on the rows
# flattened to $[N, D]$ and saves $u$, the weight and $r$; its `backward` receives the gradients
# of both outputs and returns one per input. Then the public function, which sends what a kernel
# cannot take to the reference:

# %%
#| export kernels.rmsnorm
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

# %% [markdown]
# The test sets the kernel and the reference side by side on the same inputs, forward and
# backward, against a float64 reference, with both outputs receiving an upstream gradient (as in
# the block, where $u$ feeds the residual). The tolerances follow the dtype: $10^{-5}$ relative to
# the largest value in float32, and four units of the dtype's rounding, $4\epsilon$, in float16
# ($\epsilon = 2^{-10}$) and bfloat16 ($2^{-7}$, on a GPU only).

# %%
def relative_error(got, want):
    """max |got - want| / max |want|, in float64 (the absolute error where want is all zeros)."""
    diff, scale = (got.double() - want.double()).abs().max().item(), want.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def tolerance(dtype):
    return 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps


def compare_add_rmsnorm(shape, dtype, seed=0):
    """Relative errors of (u, y, dh, dinj, dw) of the kernel against float64."""
    g = torch.Generator().manual_seed(seed)
    h, inj, gu, gy = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    w = 1 + 0.1 * torch.randn(shape[-1], generator=g, dtype=torch.float64)

    def run(fn, dtype):
        a, b, c = (t.to(DEVICE, dtype, copy=True).requires_grad_() for t in (h, inj, w))
        u, y = fn(a, b, c, 1e-6)
        (u.double() * gu.to(DEVICE) + y.double() * gy.to(DEVICE)).sum().backward()
        return u, y, a.grad, b.grad, c.grad

    return [relative_error(x, r) for x, r in zip(run(add_rmsnorm, dtype), run(add_rmsnorm_reference, torch.float64))]


from looplm.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference

print(f"{'shape':14s} {'dtype':14s} {'u':>8s} {'y':>8s} {'dh':>8s} {'dinj':>8s} {'dw':>8s}   tolerance")
for shape in ((3, 7, 24), (50, 130)):
    for dtype in (torch.float32, torch.float16):
        errors = compare_add_rmsnorm(shape, dtype)
        print(f"{str(shape):14s} {str(dtype):14s} " + " ".join(f"{e:8.1e}" for e in errors) + f"   {tolerance(dtype):.1e}")

# %% [markdown]
# The benchmark beat. These kernels are bound by memory, so the number that predicts their speed
# is the bytes they move, and the figure of merit on a GPU is the fraction of the device's copy
# bandwidth they reach. Counted in tensors of $N \times D$ read or written, the forward and
# backward of the unfused pair (an add, then `F.rms_norm`, whose backward adds the residual's
# gradient separately) against the fused kernel:

# %%
def passes(fused):
    """Tensors of N x D read or written by the injection and norm, forward and backward."""
    if fused:
        forward = 2 + 2                      # read h, inj; write u, y
        backward = 3 + 1                     # read u, dy, du; write dx (shared by h and inj)
    else:
        forward = (2 + 1) + (1 + 1)          # add: read 2, write 1; rms_norm: read 1, write 1
        backward = (2 + 1) + (2 + 1)         # norm backward: read u, dy, write du'; add du': read 2, write 1
    return forward, backward


for fused in (False, True):
    forward, backward = passes(fused)
    print(f"{'fused' if fused else 'add, then F.rms_norm':22s} forward {forward} passes, backward {backward}, "
          f"total {forward + backward}")

# %% [markdown]
# The fused kernel moves 8 tensors where the unfused pair moves 11, so on a GPU, where both run
# at the copy bandwidth, it should take about $8/11 \approx 0.73$ of the time, a speed-up of up to
# 1.4 times. Section 10.8's benchmark measures it on a GPU.

# %% [markdown]
# ## 10.3 SwiGLU
#
# The block's MLP is $W_{\text{down}}\big(\mathrm{silu}(W_{\text{gate}} x) \odot W_{\text{up}} x\big)$.
# The three matrix products stay with torch (cuBLAS does them at the hardware's peak); what sits
# between them is element-wise: $y = \mathrm{silu}(g)\,u$ with $\mathrm{silu}(g) = g\,\sigma(g)$.
# Torch computes $\mathrm{silu}(g)$ into a tensor of the hidden size, then multiplies; a fused
# kernel reads $g$ and $u$ once and writes $y$ once. For the backward it recomputes $\sigma(g)$
# from $g$ rather than storing it:
#
# $$\frac{\partial L}{\partial u} = \bar y\, g\,\sigma(g), \qquad
# \frac{\partial L}{\partial g} = \bar y\, u\, \sigma(g)\big(1 + g\,(1 - \sigma(g))\big),$$
#
# where $\bar y$ is the upstream gradient. An element-wise kernel is the vector-add tutorial with
# a different body: one flat block of `BLOCK` numbers per program.

# %%
#| export kernels.swiglu
import torch
import torch.nn.functional as F

from looplm.kernels.runtime import runs_in_triton, tl, triton

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

# %% [markdown]
# The test, on a shape whose size is not a multiple of the block (the last program's mask is
# partly off):

# %%
from looplm.kernels.swiglu import swiglu, swiglu_reference


def compare_elementwise(fn, reference, inputs, dtype, upstream):
    """Relative errors of the outputs and input gradients of fn against reference in float64."""
    def run(f, dt):
        args = [t.to(DEVICE, dt, copy=True).requires_grad_() for t in inputs]
        out = f(*args)
        (out.double() * upstream.to(DEVICE)).sum().backward()
        return [out] + [a.grad for a in args]
    return [relative_error(a, b) for a, b in zip(run(fn, dtype), run(reference, torch.float64))]


g, u, upstream = torch.randn(3, 5, 77, dtype=torch.float64) * 2, torch.randn(3, 5, 77, dtype=torch.float64), \
    torch.randn(3, 5, 77, dtype=torch.float64)
for dtype in (torch.float32, torch.float16):
    errors = compare_elementwise(swiglu, swiglu_reference, (g, u), dtype, upstream)
    print(f"{str(dtype):14s} y {errors[0]:.1e}   dg {errors[1]:.1e}   du {errors[2]:.1e}   (tolerance {tolerance(dtype):.1e})")

# %% [markdown]
# The benchmark beat, counted in tensors of the hidden size: torch's forward reads $g$, writes
# $\mathrm{silu}(g)$, reads it and $u$, writes $y$ (5); its backward (autograd through the two
# ops) reads and writes 8. The kernel's forward moves 3, its backward 5 (read $g$, $u$, $\bar y$;
# write the two gradients), and it stores no intermediate for the backward.

# %% [markdown]
# ## 10.4 Rotary embeddings
#
# Chapter 1 rotates each pair $(x_i, x_{i + d/2})$ of a query or key head by the angle of its
# position ("rotate half"):
#
# $$y_i = x_i \cos\theta_{t,i} - x_{i+d/2} \sin\theta_{t,i}, \qquad
#   y_{i+d/2} = x_{i+d/2}\cos\theta_{t,i} + x_i \sin\theta_{t,i}.$$
#
# A rotation's inverse is its transpose, the rotation by $-\theta$, so the backward is the same
# kernel with the sine negated: `SIGN` is a compile-time constant, and Triton compiles one
# version for each value. A program takes `BLOCK_R` rows, each row one (batch, head, position)
# of the input, and works out from the row number where that row lives: the kernel reads $q$ and
# $k$ in the layout `project_qkv` leaves them (a transposed view of the projection's output) by
# using their strides. The per-row tables of batched decoding ($[B, T, d/2]$) get a batch stride,
# shared tables a stride of 0.

# %%
#| export kernels.rope
import torch

from looplm.block import apply_rope
from looplm.kernels.runtime import next_power_of_2, runs_in_triton, tl, triton


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

# %% [markdown]
# The test feeds it $q$ exactly as attention makes it, a non-contiguous view, and both kinds of
# table:

# %%
from looplm.kernels.rope import rope


def rope_inputs(B=2, H=3, T=11, hs=12, per_row=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3 * H * hs, generator=g, dtype=torch.float64)
    q = qkv[..., : H * hs].view(B, T, H, hs).transpose(1, 2)            # [B, H, T, hs], strided
    cos, sin = rope_angles(hs, 64, dtype=torch.float64)
    if per_row:                                                          # each row at its own positions
        positions = torch.randint(0, 64, (B, T), generator=g)
        return q, cos[positions], sin[positions]
    return q, cos[:T], sin[:T]


for per_row in (False, True):
    q, cos, sin = rope_inputs(per_row=per_row)
    upstream = torch.randn(q.shape, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16):
        errors = compare_elementwise(lambda x: rope(x, cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)),
                                     lambda x: apply_rope(x, cos.to(DEVICE), sin.to(DEVICE)), (q,), dtype, upstream)
        print(f"{'per-row tables' if per_row else 'shared tables':15s} {str(dtype):14s} "
              f"y {errors[0]:.1e}   dx {errors[1]:.1e}")

# %% [markdown]
# ## 10.5 Causal flash attention
#
# Attention computes $O = \mathrm{softmax}(QK^\top/\sqrt{d} + M)\,V$ with the causal mask $M$.
# Written out (chapter 1's `attention_reference`) it builds the $T \times T$ score matrix in
# memory, and the softmax reads and writes it again. FlashAttention {cite:p}`dao2022flashattention`
# never builds it: a program takes a block of queries and walks over the keys a block at a time,
# keeping for each query row a running maximum $m$, a running normaliser $\ell$ and an
# unnormalised output. When a new block of scores $s$ arrives,
#
# $$m' = \max(m, \max_j s_j), \qquad \ell' = e^{m - m'}\ell + \sum_j e^{s_j - m'}, \qquad
#   \mathrm{acc}' = e^{m - m'}\mathrm{acc} + \sum_j e^{s_j - m'} v_j ,$$
#
# and at the end $O = \mathrm{acc}/\ell$: the softmax computed online, exactly (this is the
# *online softmax*; section 10.6 uses the same recurrence for the cross-entropy). Causality saves
# half the work: key blocks entirely above the diagonal are never visited, blocks below it need
# no mask, and only the blocks on the diagonal are masked. The kernel works in base 2 (the scale
# is multiplied by $\log_2 e$ so that `exp2` replaces `exp`) and stores each row's
# log-sum-exp for the backward. For float32 inputs every `tl.dot` asks for
# `input_precision="ieee"`: by default a GPU multiplies float32 in TF32, with a 10-bit mantissa,
# which would miss the $10^{-5}$ we test to by a factor of a hundred.
#
# The reference is torch's own `F.scaled_dot_product_attention(is_causal=True)`, which chapter 1
# checked against the written-out formula.

# %%
#| export kernels.attention
from looplm.kernels.runtime import tl, triton

MAX_HEAD_DIM = 128           # larger heads fall back to scaled_dot_product_attention
_LOG2E = 1.4426950408889634


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_base, v_base, start_n,
               offs_m, offs_n, offs_d, d_mask, T,
               stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
               MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one block of keys/values into the running softmax state."""
    cols = start_n + offs_n
    if MASKED:
        kt_mask = (cols[None, :] < T) & d_mask[:, None]
        v_mask = (cols[:, None] < T) & d_mask[None, :]
    else:
        kt_mask = d_mask[:, None]
        v_mask = d_mask[None, :]
    # Kᵀ block, [BLOCK_D, BLOCK_N]
    kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                 mask=kt_mask, other=0.0)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        keep = (cols[None, :] <= offs_m[:, None]) & (cols[None, :] < T)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # V block, [BLOCK_N, BLOCK_D]
    v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=v_mask, other=0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i

@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     stride_qb, stride_qh, stride_qt, stride_qd,
                     stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd,
                     stride_ob, stride_oh, stride_ot, stride_od,
                     H, T, HEAD_DIM, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Forward pass for one block of query rows of one (batch, head).

    Grid: (cdiv(T, BLOCK_M), B * H).  Query blocks are assigned in reverse
    order so that the longest rows (the last ones) start first.
    """
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = offs_m < T
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)

    # A finite start value keeps exp2(m_i - m_new) well defined even for a
    # row whose first visited block is fully masked.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys [0, start_m): strictly below the diagonal, no mask needed.
    for start_n in range(0, start_m, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, start_n,
                                   offs_m, offs_n, offs_d, d_mask, T,
                                   stride_kt, stride_kd, stride_vt, stride_vd,
                                   qk_scale, False, DOT_PRECISION)
    # Keys [start_m, start_m + BLOCK_M): the diagonal, causal mask applied.
    # Keys beyond that are above the diagonal and are skipped.
    hi = tl.minimum(start_m + BLOCK_M, T)
    for start_n in range(start_m, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, start_n,
                                   offs_m, offs_n, offs_d, d_mask, T,
                                   stride_kt, stride_kd, stride_vt, stride_vd,
                                   qk_scale, True, DOT_PRECISION)

    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=q_mask)
    # LSE is a contiguous fp32 [B * H, T] buffer (base-2 log-sum-exp).
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i),
             mask=row_mask)

# %% [markdown]
# The backward recomputes the probabilities block by block from the stored log-sum-exp,
# $P = 2^{S \log_2 e - \mathrm{lse}}$, instead of storing them. With $\bar O$ the upstream
# gradient and $\delta_i = \sum_d \bar O_{id} O_{id}$ (one small kernel computes it first),
#
# $$\bar V = P^\top \bar O, \qquad \bar P = \bar O V^\top, \qquad \bar S = P \odot (\bar P - \delta),
#   \qquad \bar Q = \bar S K / \sqrt{d}, \qquad \bar K = \bar S^\top Q / \sqrt{d}.$$
#
# FlashAttention-2's layout {cite:p}`dao2023flashattention2` runs one kernel over key blocks for
# $\bar K$ and $\bar V$, looping over the query blocks that can see them, and $\bar Q$ in a second
# kernel over query blocks. Accumulating $\bar Q$ with atomic adds from the first kernel would
# save recomputing $QK^\top$ once more, but the order of atomic adds changes from run to run and
# so would the rounding; two kernels keep the gradients deterministic. The three backward
# kernels follow the formulas line by line; they, the launch code (small blocks under the
# interpreter, larger ones on a GPU, smaller again in float32, whose tiles take twice the on-chip
# memory) and the `autograd.Function` are in Appendix C, *inside the kernels*. The public
# function, `flash_attention(q, k, v)`, sends what the kernels do not cover to
# `F.scaled_dot_product_attention`: float64, heads wider than 128, and (in the model) every call
# with a KV cache, whose queries are not the whole causal square.

# %% [markdown]
# The test: output and the three gradients against float64, on a head width that is padded (24
# to 32) and a length that is not a multiple of the block, so that the last block is partly
# masked, the diagonal is crossed inside a block, and several key blocks are visited:

# %%
from looplm.kernels.attention import flash_attention


def compare_attention(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, upstream = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))

    def run(f, dt):
        args = [t.to(DEVICE, dt, copy=True).requires_grad_() for t in (q, k, v)]
        out = f(*args)
        (out.double() * upstream.to(DEVICE)).sum().backward()
        return [out] + [a.grad for a in args]

    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)
    return [relative_error(a, b) for a, b in zip(run(flash_attention, dtype), run(sdpa, torch.float64))]


for shape in ((2, 3, 13, 8), (1, 2, 37, 24)):
    for dtype in (torch.float32, torch.float16):
        errors = compare_attention(shape, dtype)
        print(f"{str(shape):15s} {str(dtype):14s} out {errors[0]:.1e}  dq {errors[1]:.1e}  dk {errors[2]:.1e}  "
              f"dv {errors[3]:.1e}")

# %% [markdown]
# The benchmark beat: attention's memory traffic. The written-out version writes and reads the
# $T \times T$ scores (and the probabilities, and keeps them for the backward), $O(T^2)$ numbers
# per head; the flash kernel reads $Q$, $K$, $V$ and writes $O$ and one log-sum-exp per row,
# $O(T d)$. At $T = 2048$ and $d = 64$ that is 32 times fewer numbers per pass. On a GPU,
# `F.scaled_dot_product_attention` already dispatches to a flash kernel, so section 10.8 compares
# ours with it, not with the written-out version.

# %% [markdown]
# ## 10.6 The losses of all exits, without their logits
#
# Training on every step's readout (chapters 4 and 5) computes, for each step $s$ and token $n$,
#
# $$\ell_{s,n} = \log \sum_{v} e^{z_{s,n,v}} - z_{s,n,y_n}, \qquad z_{s,n,:} = W\, \mathrm{state}_{s,n} ,$$
#
# with one head $W \in \mathbb{R}^{V \times D}$ shared by all exits. Done plainly, the $S \times N
# \times V$ logits are the largest tensor of the whole model, kept for the backward: at a 50k
# vocabulary and 8192 tokens, four exits hold 1.6 billion numbers. Cut Cross-Entropy
# {cite:p}`wijmans2025cce` shows the loss needs none of them in memory. The forward walks over the
# vocabulary a block at a time with the online log-sum-exp of section 10.5 (a running maximum and
# a rescaled running sum) and picks out the target's logit when its block passes; only the
# log-sum-exp per row is kept. The backward recomputes each block of logits, turns it into its
# gradient, $\bar z = (\mathrm{softmax}(z) - \mathrm{onehot}(y))\, g$, and multiplies it into the
# two gradients on the spot:
#
# $$\overline{\mathrm{state}}_{s,n} = \sum_v \bar z_{s,n,v} W_v, \qquad \bar W_v = \sum_{s,n} \bar z_{s,n,v}\, \mathrm{state}_{s,n}.$$
#
# Three choices make it right for a looped model:
#
# - **Per-token losses in, per-token gradients out.** The function returns $\ell$ as $[S, N]$ (0
#   where the target is `ignore_index`, as `F.cross_entropy(reduction="none")` does) and its
#   backward takes *any* upstream gradient $g$ of that shape. Stage I's $p$-weighted sum and every
#   step weighting of chapter 4 build on it. Liger-Kernel's fused version computes the gradient
#   during the forward and sums it over the tokens there, before the per-token upstream gradient
#   is known, so its `reduction="none"` gradients were wrong (Liger issue #968).
# - **Float32 throughout.** Dot products accumulate in float32 and the logits stay in float32.
#   Runs in bfloat16 diverged where a fused cross-entropy accumulated in the input dtype (Liger
#   #512, axolotl #1601; OLMo-core #370 fixed it with a float32 accumulator).
# - **The head read once for all exits.** A program takes a block of tokens *for every exit at
#   once*: its tile's rows are (exit, token) pairs, so each block of $W$ it loads serves all $S$
#   exits. The $S$ states of a token differ, but they meet the same weights.
#
# The reference is the plain computation; the torch fallback is the same algorithm as the
# kernels, chunked over tokens, and serves float64 and machines without Triton.

# %%
#| export kernels.cross_entropy
import torch
import torch.nn.functional as F

from looplm.kernels.runtime import tl, triton

# Exits handled by one tile. Larger S is split into groups of this many exits
# (the head is then read once per group rather than once per exit).
_MAX_EXITS_PER_TILE = 16


def multi_exit_cross_entropy_reference(states, weight, targets, ignore_index=-100):
    """The plain computation: all S x N x V logits, then F.cross_entropy per token. -> [S, N]"""
    S, N, _ = states.shape
    logits = (states @ weight.T).to(torch.promote_types(states.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(S * N, -1), targets.repeat(S), ignore_index=ignore_index,
                           reduction="none").view(S, N)

# %% [markdown]
# The forward kernel. Row $r$ of the tile stands for exit $r / B_N$ and token
# $\text{pid} \cdot B_N + r \bmod B_N$; the exits are padded to a power of two and the padding
# rows are masked. Two loops: over the vocabulary in blocks of `BLOCK_V`, and inside it over the
# hidden size in blocks of `BLOCK_D`, accumulating the logits tile with `tl.dot` in float32.

# %%
#| export kernels.cross_entropy
@triton.jit
def _lce_fwd_kernel(
    x_ptr, w_ptr, t_ptr, loss_ptr, lse_ptr,
    S, N, V, D,
    stride_xs, stride_xn, stride_xd,
    stride_wv, stride_wd,
    stride_t,
    stride_os, stride_on,
    ignore_index,
    S_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: tokens [pid*BLOCK_N, (pid+1)*BLOCK_N) for every exit.

    Tile row r stands for exit s = r // BLOCK_N and token
    n = pid*BLOCK_N + r % BLOCK_N; rows with s >= S or n >= N are padding.
    """
    pid_n = tl.program_id(0)

    rows = tl.arange(0, S_PAD * BLOCK_N)
    s_idx = rows // BLOCK_N
    n_idx = pid_n * BLOCK_N + rows % BLOCK_N
    n_ok = n_idx < N
    row_ok = (s_idx < S) & n_ok
    s64 = s_idx.to(tl.int64)
    n64 = n_idx.to(tl.int64)
    x_rows = x_ptr + s64 * stride_xs + n64 * stride_xn

    tgt = tl.load(t_ptr + n64 * stride_t, mask=n_ok, other=ignore_index)

    d_base = tl.arange(0, BLOCK_D)
    v_base = tl.arange(0, BLOCK_V)

    m = tl.full([S_PAD * BLOCK_N], float("-inf"), tl.float32)  # running max
    l = tl.zeros([S_PAD * BLOCK_N], tl.float32)  # running sum of exp(z - m)
    z_tgt = tl.zeros([S_PAD * BLOCK_N], tl.float32)  # target logit

    for v0 in range(0, V, BLOCK_V):
        cols = v0 + v_base
        col_ok = cols < V
        w_cols = w_ptr + cols.to(tl.int64) * stride_wv

        # z = x @ W[cols].T, accumulated over D in fp32.
        z = tl.zeros([S_PAD * BLOCK_N, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_idx = d0 + d_base
            d_ok = d_idx < D
            x = tl.load(
                x_rows[:, None] + d_idx[None, :] * stride_xd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            w_t = tl.load(  # [BLOCK_D, BLOCK_V]: the head tile, transposed
                w_cols[None, :] + d_idx[:, None] * stride_wd,
                mask=d_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            z = tl.dot(x, w_t, z, input_precision=DOT_PRECISION)

        z = tl.where(col_ok[None, :], z, float("-inf"))

        # Online log-sum-exp.  Every chunk holds at least one real column,
        # so m_new is finite and exp(m - m_new) is 0 on the first chunk.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new

        is_tgt = cols[None, :] == tgt[:, None]
        z_tgt += tl.sum(tl.where(is_tgt, z, 0.0), axis=1)

    lse = m + tl.log(l)
    valid = row_ok & (tgt != ignore_index)
    loss = tl.where(valid, lse - z_tgt, 0.0)

    out_off = s64 * stride_os + n64 * stride_on
    tl.store(loss_ptr + out_off, loss, mask=row_ok)
    tl.store(lse_ptr + out_off, lse, mask=row_ok)


# %% [markdown]
# The backward kernel runs over (token blocks $\times$ vocabulary blocks). Each program owns one
# tile of logits, recomputes it, and adds its share of both gradients with `tl.atomic_add` into
# float32 buffers: the sum over the vocabulary for the states and the sum over tokens for the
# head both cross programs, and atomics are the simplest way to combine them (at the price of an
# order of addition that varies from run to run in the last bits). In 16-bit inputs the
# $\mathrm{softmax} - \mathrm{onehot}$ operand, whose values lie in $[-1, 1]$, is rounded to the
# input dtype for the tensor cores; $g$ is applied after the product for the states, and for the
# head it is divided by its largest value in the tile first, so that a small loss scale cannot
# underflow. The backward kernel, the launch code (the smallest legal tiles under the
# interpreter, where every block operation costs the same; on a GPU about 128 rows by 128
# vocabulary columns in 16-bit, smaller in float32, whose exact products run without tensor
# cores), the chunked torch fallback and the input checks are in Appendix C, *inside the
# kernels*.

# %% [markdown]
# The test: losses and both gradients against float64, with a random upstream gradient (the
# case Liger got wrong), non-power-of-two sizes everywhere, and ignored positions:

# %%
from looplm.kernels.cross_entropy import multi_exit_cross_entropy_reference, multi_exit_linear_cross_entropy


def compare_cross_entropy(S, N, D, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(S, N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = -100                                                  # ignored positions
    upstream = torch.randn(S, N, generator=g, dtype=torch.float64)

    def run(f, dt):
        x, w = states.to(DEVICE, dt, copy=True).requires_grad_(), weight.to(DEVICE, dt, copy=True).requires_grad_()
        losses = f(x, w, targets.to(DEVICE))
        (losses.double() * upstream.to(DEVICE)).sum().backward()
        return losses, x.grad, w.grad

    got, want = run(multi_exit_linear_cross_entropy, dtype), run(multi_exit_cross_entropy_reference, torch.float64)
    assert (got[0][:, ::4] == 0).all()                                   # ignored: loss 0
    return [relative_error(a, b) for a, b in zip(got, want)]


for dtype in (torch.float32, torch.float16):
    errors = compare_cross_entropy(S=3, N=13, D=24, V=53, dtype=dtype)
    print(f"S=3 N=13 D=24 V=53 {str(dtype):14s} losses {errors[0]:.1e}  d_states {errors[1]:.1e}  "
          f"d_weight {errors[2]:.1e}")

# %% [markdown]
# The float16 rows are measured against the float64 inputs, so they include the rounding of the
# inputs to float16; after the loads every sum is float32, and the gradients add one float16
# rounding of an operand and one of the result.
#
# The benchmark beat is memory, and it can be counted. The plain loss keeps the logits for its
# backward, in bfloat16 and again as the float32 copy the softmax works on; the fused loss keeps
# one float32 log-sum-exp per row and, in the backward, float32 buffers for the two gradients.
# At the GPU benchmark size ($N = 8192$ tokens, $D = 2048$, $V = 50304$):

# %%
def head_memory_gb(S, N=8192, D=2048, V=50304, fused=False):
    """Bytes the classifier head's loss holds beyond its inputs, in GB (counted, not measured)."""
    if fused:
        return (S * N * 4 * 2 + (S * N * D + V * D) * 4) / 1e9            # loss + lse; fp32 gradient buffers
    return S * N * V * (2 + 4) / 1e9                                     # bf16 logits + their fp32 copy


exits = list(range(1, 9))
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(exits, [head_memory_gb(S) for S in exits], marker="o", label="logits materialised")
ax.plot(exits, [head_memory_gb(S, fused=True) for S in exits], marker="o", label="multi-exit fused")
ax.set(xlabel="exits S (loop steps read out)", ylabel="GB", yscale="log",
       title="memory of the loss at N=8192, D=2048, V=50304 (counted)")
ax.legend()
plt.tight_layout()
plt.show()
print(f"S=4: {head_memory_gb(4):.1f} GB materialised, {head_memory_gb(4, fused=True):.2f} GB fused")

# %% [markdown]
# The time it costs is the matrix products: the forward is one product of $S N \times D$ by
# $D \times V$, and the backward recomputes it and does the two gradient products, four in all
# against the plain version's three. On a GPU that is the price of not storing the logits, and
# section 10.8's benchmark measures it against `torch.compile` and Liger-Kernel.

# %% [markdown]
# ## 10.7 The switch: `LoopLMConfig(kernels="triton")`
#
# The kernels replace operations, not parameters, so the model with kernels must hold exactly the
# torch model's parameters under exactly its names: then a checkpoint moves between the two, and
# every chapter's code (the trainer, decoding, conversion of published checkpoints) works on
# either. `looplm.kernels.loop` does it with subclasses that add no state and override only
# `forward`: a `KernelRMSNorm` is an `RMSNorm` whose forward calls the kernel, and so on. Building
# a model with `kernels="triton"` builds the torch model, then re-classes its modules in place
# (Python lets an object change its class to a subclass with the same attributes). What changes:
#
# - every `RMSNorm` runs the fused kernel (without an injection);
# - a pre-norm `Block` fuses each residual add with the norm after it: its input $x + j$ with
#   $\mathrm{RMSNorm}_1$, and $x + \mathrm{Attn}(\cdot)$ with $\mathrm{RMSNorm}_2$;
# - with `injection="add"`, the loop computes $\mathrm{RMSNorm}_{\text{inj}}(x_0)$ once per forward
#   and hands it to the first core block as its `add`, so the injection costs no pass of its own;
# - attention runs the rope kernel and, over a whole sequence, flash attention (with a KV cache,
#   the cache's own attention);
# - the dense MLP runs the SwiGLU kernel between its matrix products;
# - `model(idx, targets, return_logits=False)` returns the step losses from the multi-exit linear
#   cross-entropy and no logits: the training call that never materialises them;
# - `model.step(h, x0, cos, sin, active=a)` ends the step with the masked update, fused into the
#   last block's residual add.
#
# What a kernel does not cover runs as before, in torch: the concatenated injection (a matrix
# product), Huginn's and Ouro's norm placements (their norms still run the kernel, without the
# fused add), grouped-query attention, a mixture of experts, float64, and decoding with a KV
# cache. Rather than say so in prose only, the model reports it: `kernel_plan(model)` lists each
# operation and what computes it.

# %%
#| export kernels.loop
import inspect

import torch

from looplm.block import Block, CausalSelfAttention, RMSNorm, SwiGLU
from looplm.kernels.attention import MAX_HEAD_DIM, flash_attention
from looplm.kernels.cross_entropy import multi_exit_linear_cross_entropy
from looplm.kernels.rmsnorm import add_rmsnorm
from looplm.kernels.rope import rope
from looplm.kernels.runtime import HAS_TRITON, INTERPRET, runs_in_triton
from looplm.kernels.swiglu import swiglu
from looplm.kernels.update import masked_update
from looplm.model import IGNORE_INDEX, AddInjection, LoopLM


class KernelRMSNorm(RMSNorm):
    """RMSNorm computed by the fused kernel (without an injection)."""

    def forward(self, x):
        return add_rmsnorm(x, None, self.weight, self.eps)[1]


class KernelSwiGLU(SwiGLU):
    """SwiGLU whose silu(gate) * up is one kernel between the three matrix products."""

    def forward(self, x):
        return self.down(swiglu(self.gate(x), self.up(x)))


class KernelAttention(CausalSelfAttention):
    """Causal self-attention with the rope kernel, and flash attention over a whole sequence."""

    def project_qkv(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        return rope(q, cos, sin), rope(k, cos, sin), v                # (B, nh, T, hs) each

    def forward(self, x, cos, sin, attend=None):
        q, k, v = self.project_qkv(x, cos, sin)
        return self.project_out(flash_attention(q, k, v) if attend is None else attend(q, k, v))


class KernelBlock(Block):
    """A pre-norm Block whose residual adds are fused with the norms after them.

    forward(x, cos, sin, attend, add=None, active=None, prev=None): the block's input is x + add
    (add: the loop's injection, or None), formed in the same pass as n1(x + add). With `active`
    [B, T] (bool) and `prev` (the state before the step), rows that are not active return `prev`,
    and the final residual add does the masked update."""

    def forward(self, x, cos, sin, attend=None, add=None, active=None, prev=None):
        n1, n2 = self.norms
        x, a = add_rmsnorm(x, add, n1.weight, n1.eps)               # x + add, and n1 of it
        x, m = add_rmsnorm(x, self.attn(a, cos, sin, attend), n2.weight, n2.eps)
        if active is None:
            return x + self.mlp(m)
        return masked_update(prev, x, self.mlp(m), active)

# %% [markdown]
# The loop's part: a step that hands the injection to the first core block, and the training
# forward without logits. The readout after each step is then the normed state $z_t$, and the
# losses of all $S$ steps come from one call of the multi-exit cross-entropy on the stacked
# states. The step losses are what every objective of chapters 4 to 6 reads, so Stage I's
# $p$-weighted sum and every step weighting work unchanged on top of it.

# %%
#| export kernels.loop
class KernelLoopLM(LoopLM):
    """LoopLM on kernels: the same parameters and outputs; see kernel_plan for what runs where."""

    def fuses_injection(self):
        """True when every step's injection is fused into the first core block's first norm."""
        c = self.config
        return (isinstance(self.injection, AddInjection) and isinstance(self.core[0], KernelBlock)
                and not c.feedback_norm)

    def step(self, h, x0, cos, sin, attend=None, active=None):
        """LoopLM.step; active [B, T] (bool, optional): rows that are not active keep h."""
        if not self.fuses_injection():
            new = super().step(h, x0, cos, sin, attend)
            return new if active is None else torch.where(active[..., None], new, h)
        x, inj, last = h, self._injection(x0), len(self.core) - 1
        for i, block in enumerate(self.core):
            masked = active is not None and i == last and isinstance(block, KernelBlock)
            x = block(x, cos, sin, None if attend is None else attend(i), add=inj if i == 0 else None,
                      active=active if masked else None, prev=h if masked else None)
        if active is not None and not isinstance(self.core[last], KernelBlock):
            x = torch.where(active[..., None], x, h)
        return x

    def _injection(self, x0):
        """RMSNorm_inj(x0), computed once per x0 (and grad mode): it is the same at every step.
        Not under activation checkpointing, whose recomputed steps must redo what they did."""
        if not getattr(self, "_cache_injection", True):
            return self.injection.norm(x0)
        if not isinstance(getattr(self, "_injected", None), dict):
            self._injected = {}
        key = torch.is_grad_enabled()                 # truncated steps run without a graph
        cached = self._injected.get(key)
        if cached is None or cached[0] is not x0:
            cached = self._injected[key] = (x0, self.injection.norm(x0))
        return cached[1]

    def forward(self, idx, targets=None, *args, return_logits=True, **kwargs):
        """LoopLM.forward; return_logits=False (with targets) computes the step losses without
        materialising logits: out.logits and out.weighted_logits are then None."""
        self._check_kernels_can_run()
        self._injected = {}
        self._cache_injection = not inspect.signature(LoopLM.forward).bind(self, idx, targets, *args, **kwargs) \
            .arguments.get("checkpoint", False)
        if return_logits:
            try:
                return super().forward(idx, targets, *args, **kwargs)
            finally:
                self._injected = {}
        if targets is None:
            raise ValueError("return_logits=False needs targets: without logits, the losses are what it returns")
        # the step function with the states readout is bound here, so that a step recomputed
        # for activation checkpointing (during backward) reads out states as well
        self._step_and_read = self._step_and_read_states
        self._losses_from_states = True
        try:
            return super().forward(idx, targets, *args, **kwargs)
        finally:
            del self._step_and_read
            self._losses_from_states, self._injected = False, {}

    def _check_kernels_can_run(self):
        weight = self.lm_head.weight
        if weight.device.type == "cpu" and weight.dtype in (torch.float16, torch.float32) and not INTERPRET:
            raise RuntimeError("kernels='triton' runs Triton kernels, which need a GPU; on a CPU set "
                               "TRITON_INTERPRET=1 before importing looplm (Triton's interpreter: slow, "
                               "for tests), or use kernels='torch'")

    def _step_and_read_states(self, h, x0, cos, sin, read=True):
        """_step_and_read with the normed state z_t as the readout instead of logits."""
        h = self.step(h, x0, cos, sin)
        routed = self.take_routing(self.core)
        if not read:
            return h, None, None, routed
        c = self.config
        z = self.norm(h) if c.norm_before_coda else h
        for block in self.coda:
            z = block(z, cos, sin)
        z = z if c.feedback_norm else self.norm(z)
        routed = routed + self.take_routing(self.coda)
        return h, z, None if self.exit_gate is None else self.exit_gate(z), routed

    def _output(self, logits, gates, hidden, targets=None, routing=None):
        if not getattr(self, "_losses_from_states", False):
            return super()._output(logits, gates, hidden, targets, routing)
        states = torch.stack(logits)                                    # (S, B, T, D): z_1 .. z_S
        # everything but the logits: zero-width stand-ins keep LoopLM's bookkeeping in one place
        out = super()._output([z[..., :0] for z in logits], gates, hidden, None, routing)
        out.logits = out.weighted_logits = None
        S, B, T, D = states.shape
        states, targets_flat = states.view(S, B * T, D), targets.reshape(B * T)
        # steps that ran without gradients (grad_steps) must not send any to the head either
        first = next((t for t, z in enumerate(logits) if z.requires_grad), S)
        parts = []
        if first > 0:
            with torch.no_grad():
                parts.append(multi_exit_linear_cross_entropy(states[:first], self.lm_head.weight, targets_flat))
        if first < S:
            parts.append(multi_exit_linear_cross_entropy(states[first:], self.lm_head.weight, targets_flat))
        out.step_losses = torch.cat(parts).view(S, B, T)
        out.loss = out.step_losses[-1].sum() / (targets != IGNORE_INDEX).sum()
        return out

# %% [markdown]
# `use_kernels` does the re-classing; `kernel_plan` reads the result back. It looks at the modules
# the model actually has and the dtype and device of its weights, so what it reports is what runs.

# %%
#| export kernels.loop
def use_kernels(model):
    """Re-class model's modules in place to their kernel subclasses (the same parameters and
    state_dict keys); what the kernels do not cover keeps its torch module. -> model"""
    if not isinstance(model, LoopLM):
        raise TypeError(f"model must be a LoopLM, got {type(model).__name__}")
    for module in model.modules():
        kind = type(module)
        if kind is RMSNorm:
            module.__class__ = KernelRMSNorm
        elif kind is SwiGLU:
            module.__class__ = KernelSwiGLU
        elif kind is CausalSelfAttention:             # not chapter 8's grouped-query attention
            module.__class__ = KernelAttention
        elif kind is Block and module.norm_style == "pre":
            module.__class__ = KernelBlock
    if type(model) is LoopLM:
        model.__class__ = KernelLoopLM
    return model


def kernel_plan(model):
    """[(operation, what computes it)] for a LoopLM: "kernel: …" or "torch: …" with the reason."""
    weight = model.lm_head.weight
    if not isinstance(model, KernelLoopLM):
        return [("everything", "torch: kernels='torch'")]
    if not runs_in_triton(weight):
        why = ("Triton is not installed" if not HAS_TRITON else "float64" if weight.dtype == torch.float64
               else "bfloat16 under the interpreter" if weight.dtype == torch.bfloat16 else str(weight.dtype))
        return [("everything", f"torch: {why}")]
    blocks = [*model.prelude, *model.core, *model.coda]
    c = model.config

    def share(kind, attribute=None):
        hits = sum(isinstance(getattr(b, attribute) if attribute else b, kind) for b in blocks)
        return f"{hits} of {len(blocks)} blocks"

    plain = [b for b in blocks if isinstance(b.attn, KernelAttention)]
    if model.fuses_injection():
        injection = "kernel: fused add + RMSNorm"
    elif c.injection != "add":
        injection = f"torch: injection={c.injection!r}"
    elif c.feedback_norm:
        injection = "torch: feedback_norm"
    else:
        injection = f"torch add: norm_style={c.norm_style!r}"
    return [
        ("injection + first norm of the step", injection),
        ("residual add + next norm", f"kernel: fused add + RMSNorm in {share(KernelBlock)}"
         if any(isinstance(b, KernelBlock) for b in blocks) else f"torch add: norm_style={c.norm_style!r}"),
        ("every other RMSNorm", "kernel: RMSNorm"),
        ("rotary embedding", f"kernel: in {share(KernelAttention, 'attn')}" if plain
         else "torch: grouped-query attention"),
        ("attention over a sequence", f"kernel: flash attention in {share(KernelAttention, 'attn')}"
         if plain and c.head_dim <= MAX_HEAD_DIM else "torch: scaled_dot_product_attention"),
        ("attention with a KV cache", "torch: the cache's attention"),
        ("MLP", f"kernel: SwiGLU in {share(KernelSwiGLU, 'mlp')}" if c.mlp == "dense"
         else f"torch: mlp={c.mlp!r}"),
        ("step losses", "kernel: multi-exit linear cross-entropy with return_logits=False; "
                        "torch from the logits otherwise"),
        ("masked state update (step(active=))", "kernel: fused into the last residual add"
         if model.fuses_injection() and isinstance(model.core[-1], KernelBlock) else "torch: where"),
    ]

# %% [markdown]
# The config's side: `kernels="triton"` is checked when the config is made (a clear error where
# Triton is missing), and the backend registers itself in chapter 2's `KERNEL_BACKENDS`. The
# package's index imports this module, so `LoopLMConfig` knows the name wherever `looplm` is
# imported; without Triton the kernels' modules still import, and only `kernels="triton"` is
# refused.

# %%
#| export kernels.loop
from looplm.checks import require_choice
from looplm.model import CONFIG_CHECKS, KERNEL_BACKENDS


def _validate_kernels(cfg):
    require_choice("kernels", cfg.kernels, ("torch", *KERNEL_BACKENDS))
    if cfg.kernels == "triton" and not HAS_TRITON:
        raise ValueError("kernels='triton' needs Triton, which is not installed here (Linux: pip install "
                         "triton; there are no wheels for macOS or Windows); use kernels='torch'")


KERNEL_BACKENDS["triton"] = use_kernels
CONFIG_CHECKS["kernels"] = _validate_kernels

# %% [markdown]
# Four models and what computes what in each: the additive-injection loop this book trains, one
# with Huginn's layout (concatenated injection, its norm placement, a bias on $q$ and $k$), one
# with Ouro's (sandwich norms, the final norm fed back), and a mixture of experts:

# %%
from looplm.kernels.loop import kernel_plan
from looplm.model import LoopLM, LoopLMConfig

TINY = dict(vocab_size=37, d_model=32, n_heads=2, n_loops=3, max_seq_len=32)
LAYOUTS = {
    "additive": dict(injection="add", init_state="zeros", n_prelude=1, n_coda=1, exit_gate=True),
    "Huginn-like": dict(injection="concat", init_state="random", norm_style="huginn", qk_bias=True,
                        n_prelude=1, n_coda=1, norm_before_coda=True),
    "Ouro-like": dict(norm_style="sandwich", feedback_norm=True),
    "MoE": dict(injection="add", init_state="zeros", mlp="moe", n_experts=4, top_k=2),
}
plans = {name: kernel_plan(LoopLM(LoopLMConfig(**TINY, **options, kernels="triton")))
         for name, options in LAYOUTS.items()}
for i, (operation, _) in enumerate(plans["additive"]):
    print(f"{operation}")
    for name, plan in plans.items():
        print(f"    {name:12s} {plan[i][1]}")

# %% [markdown]
# The parameters are the torch model's, name for name, so a state dict loads into either. The
# test builds both from one seed and compares outputs and gradients: logits, step losses, the
# exit gate, the loss, and every parameter's gradient, with an upstream gradient on the step
# losses that weights the steps differently (as Stage I's $p$-weighted sum does):

# %%
def compare_models(options, dtype=torch.float32, seed=0, return_logits=True):
    """Largest relative error of the kernel model against the torch model, outputs and gradients."""
    torch.manual_seed(seed)
    reference = LoopLM(LoopLMConfig(**TINY, **options)).to(DEVICE, dtype)
    fast = LoopLM(LoopLMConfig(**TINY, **options, kernels="triton")).to(DEVICE, dtype)
    fast.load_state_dict(reference.state_dict())                        # strict: the same names
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, 37, (2, 13), generator=g), torch.randint(0, 37, (2, 13), generator=g)
    targets[0, :4] = -100                                               # prompt positions: ignored
    weights = torch.rand(3, 1, 1, generator=g)
    errors = {}
    outs = []
    for model in (reference, fast):
        kwargs = {} if model is reference or return_logits else dict(return_logits=False)
        out = model(idx.to(DEVICE), targets.to(DEVICE), generator=torch.Generator().manual_seed(1), **kwargs)
        (out.step_losses * weights.to(DEVICE, out.step_losses.dtype)).sum().backward()
        outs.append(out)
    for name in ("logits", "step_losses", "gate", "loss"):
        a, b = getattr(outs[0], name), getattr(outs[1], name)
        if a is not None and b is not None:
            errors[name] = relative_error(b, a)
    errors["gradients"] = max(relative_error(q.grad, p.grad) for p, q in zip(reference.parameters(), fast.parameters())
                              if p.grad is not None and p.grad.abs().max() > 0)
    return errors


for name, options in LAYOUTS.items():
    errors = compare_models(options)
    print(f"{name:12s} " + "  ".join(f"{k} {v:.1e}" for k, v in errors.items()))
errors = compare_models(LAYOUTS["additive"], return_logits=False)
print(f"{'no logits':12s} " + "  ".join(f"{k} {v:.1e}" for k, v in errors.items()))

# %% [markdown]
# Agreement at one step does not show that training agrees: errors could compound over
# optimizer steps. The convergence test (Liger-Kernel's practice) trains the same tiny model from
# the same seed, once per path, and compares the loss curves: ten AdamW steps on one batch, which
# the model memorises, so that the loss moves a long way in few steps.

# %%
def loss_curve(kernels, steps=10, seed=0, return_logits=True, dtype=torch.float32):
    """Mean step loss over `steps` AdamW steps on one batch (memorised), from one seed."""
    torch.manual_seed(seed)
    model = LoopLM(LoopLMConfig(**TINY, **CONVERGENCE, kernels=kernels)).to(DEVICE, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    kwargs = {} if kernels == "torch" else dict(return_logits=return_logits)
    curve = []
    for _ in range(steps):
        loss = model(idx[:, :-1], idx[:, 1:], **kwargs).step_losses.mean()   # every step's loss, equally
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return curve


CONVERGENCE = dict(injection="add", init_state="zeros")
curves = {"torch": loss_curve("torch"), "triton": loss_curve("triton"),
          "triton, no logits": loss_curve("triton", return_logits=False)}
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
for name, curve in curves.items():
    left.plot(range(1, 11), curve, marker="o" if name == "torch" else None, label=name)
    if name != "torch":
        right.plot(range(1, 11), [abs(a - b) / b for a, b in zip(curve, curves["torch"])], marker="o", label=name)
left.set(xlabel="optimizer step", ylabel="mean step loss", title="the same model, trained both ways")
right.set(xlabel="optimizer step", ylabel="|loss - torch's| / torch's", title="how far the curves differ", ylim=(0, None))
right.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
left.legend()
right.legend()
plt.tight_layout()
plt.show()
print("largest relative difference:", {name: f"{max(abs(a - b) / b for a, b in zip(c, curves['torch'])):.1e}"
                                       for name, c in curves.items() if name != "torch"})

# %% [markdown]
# ## 10.8 The benchmark, and what decoding should do with exited tokens
#
# `python -m looplm.bench kernels` (Appendix C, *inside the kernels*, builds it) runs on a GPU:
# every kernel against torch eager, `torch.compile` of the same function and Liger-Kernel when it
# is installed, forward and forward + backward, timed side by side in one run with
# `triton.testing.do_bench`, with the peak memory of each call and a roofline column (the bytes
# or FLOPs the function needs, over the time, as a share of the copy bandwidth or matmul
# throughput the run measures on the same device first). It prints a table and saves a plot. The
# targets it is built to test, each a ratio within one run:
#
# - fused RMSNorm + injection, forward + backward at 16384 × 4096 in bfloat16: at least 1.1 times
#   as fast as the add followed by `F.rms_norm`, and at least 80% of the copy bandwidth (the pass
#   count of section 10.2 predicts up to 1.4 times);
# - the 4-exit linear cross-entropy at $N = 8192$, $D = 2048$, $V = 50304$ in bfloat16, forward
#   + backward: faster than `torch.compile` of the per-exit loss, with peak memory at or below
#   Liger's fused loss on the concatenated rows;
# - a full training step of a looped model with `kernels="triton"` faster than the same model
#   under `torch.compile`.
#
# **No GPU was available when this chapter was last executed, so none of these has been
# measured yet;** the table goes here, with the device it came from, when one is. Two doubts to
# check then: the cross-entropy does four products where the plain loss does three (the price of
# not storing logits), so beating `torch.compile` on time is not assured; and the fused kernels
# have never been compiled for a real GPU in this book's runs, only interpreted. On a CPU the
# command says that timings need a GPU and runs the correctness checks instead:

# %% tags=["timing"]
checks = subprocess.run([sys.executable, "-m", "looplm.bench", "kernels", "--device", "cpu", "--repeats", "5"],
                        capture_output=True, text=True,
                        env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"})
print(checks.stdout, checks.stderr[-2000:])

# %% [markdown]
# The last table is the decoding question of section 10.1, which needs no GPU to be asked. Under
# per-token exit, chapter 7's decoder drops the exited tokens from the batch by indexing (`h[keep]`,
# and the same for the inputs, the rope rows and the cache rows), so every later step runs on
# fewer rows. The alternative runs every row to the last step and masks the exited ones with the
# masked update: more arithmetic, but no gathers, no host synchronisation for `keep.any()`, and
# fixed shapes. The benchmark times one decoding position's loop both ways (the states only: the
# cache gathers, which only indexing pays, are left out), for three draws of the exit steps.
#
# In the stored run, on this CPU with one thread, masking took 1.31 to 1.36 times as long as
# indexing in all three draws: with exits spread evenly over 8 steps, indexing skips about
# half the rows' steps, and that outweighs the gathers. So decoding keeps indexing, as chapter 7
# built it. A GPU at small batch is a different machine (a step there costs about the same for 4
# rows as for 64, while a host synchronisation stalls the launch queue), and the same command
# measures the kernel model's fused masked step there; the early-exit decoder that comes next
# builds on whichever is faster.

# %% [markdown]
# ## 10.9 Bad input gets a clear error
#
# The config refuses a backend it does not know, and `kernels="triton"` where Triton is missing;
# the kernels name the argument that is wrong; and a kernel model on a CPU without the
# interpreter says what to do rather than failing inside Triton:

# %% tags=["nbval-check-output"]
import torch

from looplm.kernels import multi_exit_linear_cross_entropy
from looplm.model import LoopLMConfig

for attempt in (lambda: LoopLMConfig(vocab_size=37, d_model=32, n_heads=2, kernels="cuda"),
                lambda: multi_exit_linear_cross_entropy(torch.randn(2, 4, 8), torch.randn(10, 9),
                                                        torch.randint(0, 10, (4,)))):
    try:
        attempt()
    except (ValueError, TypeError) as e:
        print(f"{type(e).__name__}: {e}")
code = ("import torch; from looplm.model import LoopLM, LoopLMConfig\n"
        "LoopLM(LoopLMConfig(vocab_size=37, d_model=32, n_heads=2, kernels='triton'))(torch.zeros(1, 4, dtype=torch.long))")
run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
print(run.stderr.strip().splitlines()[-1] if not torch.cuda.is_available() else "(this machine has a GPU)")

# %% [markdown]
# ## Summary
#
# `looplm.kernels` (new; Triton optional):
#
# | name | what it does |
# |---|---|
# | `add_rmsnorm(h, inj, weight, eps)` | $(h + j,\ \mathrm{RMSNorm}(h + j))$ in one pass, forward and backward, the weight's gradient in two stages |
# | `swiglu(g, u)` | $\mathrm{silu}(g)\,u$ fused, forward and backward |
# | `rope(x, cos, sin)` | chapter 1's rotary embedding (rotate half), forward and backward (the inverse rotation) |
# | `flash_attention(q, k, v)` | causal attention with an online softmax, forward and FlashAttention-2's backward |
# | `multi_exit_linear_cross_entropy(states, weight, targets, ignore_index)` | per-token losses $[S, N]$ of every exit through one head, without the logits; any upstream gradient |
# | `masked_update(h, x, delta, active)` | $\mathrm{where}(a, x + \delta, h)$ in one pass, for per-token exit |
# | `loop.use_kernels`, `loop.kernel_plan` | the kernel model (same parameters), and what computes each operation |
#
# Also: `LoopLMConfig(kernels="torch" | "triton")`, `model(idx, targets, return_logits=False)`,
# `model.step(…, active=)`, and `python -m looplm.bench kernels`.
#
# What we showed, all under the interpreter on a CPU: every kernel equals its float64 reference
# forward and backward within $10^{-5}$ relative in float32 and within $4\epsilon$ in float16, on
# shapes that are not powers of two, with masked rows and ignored targets; the kernel model
# equals the torch model within $10^{-5}$ in outputs and every gradient, on four layouts, with and
# without logits; ten training steps give loss curves that agree within $10^{-7}$; and dropping
# exited rows beat masking them on a CPU in all three draws. What is not shown: any GPU timing.

# %% [markdown]
# ## Exercises
#
# Each exercise is a module in `exercises/ch10/` with a kernel and a function for you to write,
# plus a file of graded tests next to it. They run in the interpreter on a CPU, like the chapter.
# The reference solutions are in `exercises/solutions/ch10/`. Under each exercise are hints,
# folded away.

# %% [markdown]
# **Exercise 10.1: A masked row-wise softmax** (`ex1_masked_softmax.py`). Write a kernel that
# takes the softmax of each row over its first `lengths[r]` entries only, with zeros after them,
# for any row width. The tests compare it with torch on padded rows, rows of one entry, huge
# values and float16.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Load the row with `other=float("-inf")` where the mask is off: $e^{-\infty} = 0$, so the padding
# drops out of both the maximum and the sum without a special case.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# The mask for the load is `cols < length` (the row's real entries); the mask for the store is
# `cols < D`, so that the zeros after the real entries are written too.
# ```

# %% [markdown]
# **Exercise 10.2: The online log-sum-exp** (`ex2_online_logsumexp.py`). Write the recurrence of
# sections 10.5 and 10.6 on its own: a kernel that walks along each row a block at a time and
# returns the row's log-sum-exp, without ever holding more than one block. The tests use rows
# many blocks long, values near 1000, and rows that are mostly $-\infty$.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Keep $m$ and $\ell$ per lane (vectors of `BLOCK`), update them element-wise in the loop, and
# combine the lanes once at the end with the same rescaling: $\mathrm{lse} = M + \log \sum_i
# \ell_i e^{m_i - M}$ with $M = \max_i m_i$.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# A lane that has seen only $-\infty$ has $m = -\infty$, and $e^{m - m'}$ is then
# $e^{-\infty - (-\infty)}$, which is `nan`. Subtract a stand-in 0 where the new maximum is
# $-\infty$ (`tl.where`), and leave such lanes out of the final sum.
# ```

# %% [markdown]
# **Exercise 10.3: GeGLU's backward** (`ex3_geglu_backward.py`). Section 10.3 derived SwiGLU's
# backward; do the same for GeGLU, $\mathrm{gelu}(g)\,u$ with GELU's tanh form, and write it as a
# kernel. The tests compare it with autograd in float64 and at points you can check by hand.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# With $a = c(g + k g^3)$ and $t = \tanh a$: $\frac{d}{dg}\,\tfrac12 g(1 + t) = \tfrac12(1 + t) +
# \tfrac12 g\,(1 - t^2)\, a'$, and $a' = c(1 + 3k g^2)$.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# $\tanh a = 2\sigma(2a) - 1$, and `tl.sigmoid` exists. Compute in float32 (`.to(tl.float32)`
# after each load) and cast once when storing.
# ```

# %% [markdown]
# The next cell grades your versions; every test fails until you write the code.

# %%
from looplm.grade import grade

report = grade("ch10")
