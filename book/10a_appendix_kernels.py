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
# # Appendix C, continued: inside the kernels
#
# Chapter 10 shows each kernel's idea: the torch reference, the forward kernel, the backward's
# formulas, a check against float64 and what the benchmark measures. This part of Appendix C
# holds the rest: the backward kernels of attention and of the multi-exit cross-entropy, their
# launch code and the cross-entropy's torch fallback; the test batteries of every kernel and of
# the model switch; and `python -m looplm.bench kernels`. Its cells extend the modules of
# `kernels/` and `looplm/bench.py`.
#
# Without a GPU the kernels run in Triton's interpreter, which the first cell switches on; the
# tests run the same way under `make test` (the test configuration sets `TRITON_INTERPRET=1`). On
# a machine with a GPU, `TRITON_INTERPRET=0 python -m pytest tests/test_10a_appendix_kernels.py`
# runs them natively, in bfloat16 too.

# %% tags=["hide-input"]
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")        # before triton is imported

import inspect
import subprocess
import sys
import tempfile
from pathlib import Path

import torch.nn.functional as F

from looplm.bench import BENCHMARKS, _median_seconds
from looplm.checks import require_int
from looplm.model import LoopLM, LoopLMConfig
from looplm.testing import run_tests

torch.set_num_threads(1)
_ = torch.manual_seed(0)

# %% [markdown]
# ## Attention's backward kernels
#
# The three kernels of section 10.5's backward: $\delta = \mathrm{rowsum}(\bar O \odot O)$; $\bar K$
# and $\bar V$ over key blocks, each looping over the query blocks at or below the diagonal (the
# diagonal ones masked); and $\bar Q$ over query blocks. Each recomputes $P$ from the stored
# base-2 log-sum-exp.

# %%
#| export kernels.attention
from looplm.kernels.runtime import tl, triton


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA,
                           stride_ob, stride_oh, stride_ot, stride_od,
                           stride_dob, stride_doh, stride_dot, stride_dod,
                           H, T, HEAD_DIM,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[i] = Σ_d dO[i, d] · O[i, d], in fp32.  Grid: (cdiv(T, BLOCK_M), B*H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < T
    mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh
                + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=row_mask)

@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m,
                offs_m, offs_n, offs_d, d_mask, T,
                stride_qt, stride_qd, stride_dot, stride_dod, qk_scale,
                MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add one block of query rows to dK and dV (computed transposed)."""
    rows = start_m + offs_m
    row_mask = rows < T
    # Qᵀ block, [BLOCK_D, BLOCK_M]
    qt = tl.load(q_base + rows[None, :] * stride_qt + offs_d[:, None] * stride_qd,
                 mask=row_mask[None, :] & d_mask[:, None], other=0.0)
    lse = tl.load(lse_base + rows, mask=row_mask, other=0.0)
    # Sᵀ and Pᵀ, [BLOCK_N, BLOCK_M]
    st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale
    pt = tl.math.exp2(st - lse[None, :])
    if MASKED:
        keep = (rows[None, :] >= offs_n[:, None]) & row_mask[None, :]
    else:
        keep = row_mask[None, :]
    pt = tl.where(keep, pt, 0.0)
    # dO block, [BLOCK_M, BLOCK_D]
    do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    # dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ - delta)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    delta = tl.load(delta_base + rows, mask=row_mask, other=0.0)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
    return dk, dv

@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                          stride_qb, stride_qh, stride_qt, stride_qd,
                          stride_kb, stride_kh, stride_kt, stride_kd,
                          stride_vb, stride_vh, stride_vt, stride_vd,
                          stride_dob, stride_doh, stride_dot, stride_dod,
                          stride_dkb, stride_dkh, stride_dkt, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvt, stride_dvd,
                          H, T, HEAD_DIM, qk_scale, sm_scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK and dV for one block of BLOCK_N keys of one (batch, head).

    Grid: (cdiv(T, BLOCK_N), B * H).  Loops over the query rows from the
    diagonal to T in steps of BLOCK_M; rows before the key block are
    skipped because they cannot attend to it.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh.to(tl.int64) * T
    delta_base = DELTA + pid_bh.to(tl.int64) * T

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    kv_mask = (offs_n[:, None] < T) & d_mask[None, :]
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query rows [start_n, start_n + BLOCK_N): the diagonal, masked.
    diag_end = tl.minimum(start_n + BLOCK_N, T)
    for start_m in range(start_n, diag_end, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             start_m, offs_m, offs_n, offs_d, d_mask, T,
                             stride_qt, stride_qd, stride_dot, stride_dod,
                             qk_scale, True, DOT_PRECISION)
    # Query rows [start_n + BLOCK_N, T): every key of the block is visible.
    for start_m in range(start_n + BLOCK_N, T, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             start_m, offs_m, offs_n, offs_d, d_mask, T,
                             stride_qt, stride_qd, stride_dot, stride_dod,
                             qk_scale, False, DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh
             + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh
             + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)

@triton.jit
def _dq_block(dq, q, do, lse, delta, k_base, v_base, start_n,
              offs_m, offs_n, offs_d, d_mask, T,
              stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
              MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add one block of keys to dQ."""
    cols = start_n + offs_n
    if MASKED:
        kv_mask = (cols[None, :] < T) & d_mask[:, None]
    else:
        kv_mask = d_mask[:, None]
    # Kᵀ and Vᵀ blocks, [BLOCK_D, BLOCK_N]
    kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                 mask=kv_mask, other=0.0)
    vt = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None] * stride_vd,
                 mask=kv_mask, other=0.0)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        keep = (cols[None, :] <= offs_m[:, None]) & (cols[None, :] < T)
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
    return dq

@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                        stride_qb, stride_qh, stride_qt, stride_qd,
                        stride_kb, stride_kh, stride_kt, stride_kd,
                        stride_vb, stride_vh, stride_vt, stride_vd,
                        stride_dob, stride_doh, stride_dot, stride_dod,
                        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                        H, T, HEAD_DIM, qk_scale, sm_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ for one block of BLOCK_M query rows of one (batch, head).

    Grid: (cdiv(T, BLOCK_M), B * H), longest rows first.  Loops over the
    keys from 0 to the diagonal in steps of BLOCK_N.
    """
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    do_base = DO + b * stride_dob + h * stride_doh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = offs_m < T
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=row_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys [0, start_m): below the diagonal, no mask.  Padded rows
    # (offs_m >= T) have q = dO = delta = 0, so they contribute dS = 0.
    for start_n in range(0, start_m, BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, start_n,
                       offs_m, offs_n, offs_d, d_mask, T,
                       stride_kt, stride_kd, stride_vt, stride_vd,
                       qk_scale, False, DOT_PRECISION)
    # Keys [start_m, start_m + BLOCK_M): the diagonal, masked.
    hi = tl.minimum(start_m + BLOCK_M, T)
    for start_n in range(start_m, hi, BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, start_n,
                       offs_m, offs_n, offs_d, d_mask, T,
                       stride_kt, stride_kd, stride_vt, stride_vd,
                       qk_scale, True, DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh
             + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)

# %% [markdown]
# The launch code picks the block sizes (small ones under the interpreter, where every block
# operation costs the same; larger ones on a GPU, smaller in float32 whose tiles take twice the
# on-chip memory), and the public function sends what the kernels do not cover to
# `F.scaled_dot_product_attention`: float64, heads wider than 128, and (in the model) every call
# with a KV cache, whose queries are not the whole causal square.

# %%
#| export kernels.attention
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from looplm.kernels.runtime import INTERPRET, next_power_of_2, runs_in_triton, triton


class _Config(NamedTuple):
    """Block sizes and launch options.

    ``fwd_m``/``fwd_n``: query rows per program / keys per step (forward).
    ``kv_n``/``kv_m``: keys per program / query rows per step (dK, dV).
    ``dq_m``/``dq_n``: query rows per program / keys per step (dQ).
    Each program-level block must be a multiple of its step block so that the
    diagonal region is covered by whole steps.
    """

    fwd_m: int
    fwd_n: int
    kv_n: int
    kv_m: int
    dq_m: int
    dq_n: int
    num_warps: int
    num_stages: int

    def check(self) -> None:
        for name in self._fields[:6]:
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"config.{name} must be a power of two >= 16, got {value}")
        if self.fwd_m % self.fwd_n or self.kv_n % self.kv_m or self.dq_m % self.dq_n:
            raise ValueError(f"program blocks must be multiples of step blocks: {self}")


def _default_config(dtype: torch.dtype, block_d: int, interpreted: bool) -> _Config:
    if interpreted:
        # The interpreter's cost grows with the number of block operations,
        # so small tiles keep tests quick and still exercise every code path.
        return _Config(16, 16, 16, 16, 16, 16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # fp32 tiles take twice the shared memory of 16-bit ones.
        return _Config(64, 32, 32, 32, 32, 32, num_warps=4, num_stages=2)
    if block_d <= 64:
        return _Config(128, 64, 64, 32, 64, 32, num_warps=4, num_stages=3)
    return _Config(128, 64, 64, 32, 64, 32, num_warps=8, num_stages=2)


def _block_d(hs: int) -> int:
    return max(16, next_power_of_2(hs))


def _dot_precision(dtype: torch.dtype) -> str:
    # "ieee" gives true fp32 products; for 16-bit inputs the setting is ignored.
    return "ieee" if dtype == torch.float32 else "tf32"


def _device_guard(t: torch.Tensor):
    if t.is_cuda:
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


def _forward(q, k, v, cfg: _Config):
    B, H, T, hs = q.shape
    block_d = _block_d(hs)
    o = torch.empty_like(q)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    sm_scale = 1.0 / math.sqrt(hs)
    grid = (triton.cdiv(T, cfg.fwd_m), B * H)
    with _device_guard(q):
        _attn_fwd_kernel[grid](
            q, k, v, o, lse,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, T, hs, sm_scale * _LOG2E,
            BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, BLOCK_D=block_d,
            DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return o, lse


def _backward(do, q, k, v, o, lse, cfg: _Config):
    B, H, T, hs = q.shape
    block_d = _block_d(hs)
    sm_scale = 1.0 / math.sqrt(hs)
    qk_scale = sm_scale * _LOG2E
    prec = _dot_precision(q.dtype)
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    with _device_guard(q):
        _attn_bwd_delta_kernel[(triton.cdiv(T, cfg.dq_m), B * H)](
            o, do, delta, *o.stride(), *do.stride(), H, T, hs,
            BLOCK_M=cfg.dq_m, BLOCK_D=block_d, num_warps=cfg.num_warps,
        )
        _attn_bwd_dkdv_kernel[(triton.cdiv(T, cfg.kv_n), B * H)](
            q, k, v, do, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            *dk.stride(), *dv.stride(),
            H, T, hs, qk_scale, sm_scale,
            BLOCK_M=cfg.kv_m, BLOCK_N=cfg.kv_n, BLOCK_D=block_d, DOT_PRECISION=prec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        _attn_bwd_dq_kernel[(triton.cdiv(T, cfg.dq_m), B * H)](
            q, k, v, do, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, T, hs, qk_scale, sm_scale,
            BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, BLOCK_D=block_d, DOT_PRECISION=prec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dq, dk, dv


class _FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward (see module docs)."""

    @staticmethod
    def forward(ctx, q, k, v, cfg):
        o, lse = _forward(q, k, v, cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.cfg = cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.cfg)
        return dq, dk, dv, None


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------

def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D [B, H, T, hs], got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} must have the same shape as q {tuple(q.shape)}, "
                f"got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the same dtype as q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the same device as q ({q.device}), got {t.device}")


def _use_triton(q: torch.Tensor) -> bool:
    return runs_in_triton(q) and q.shape[-1] <= MAX_HEAD_DIM and q.numel() > 0


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    _config=None) -> torch.Tensor:
    """Causal scaled dot-product attention, ``softmax(q kᵀ / sqrt(hs) + mask) v``.

    Args:
        q, k, v: tensors of shape ``[B, H, T, hs]`` with identical shape, dtype
            and device.  Grouped key/value heads must be repeated to ``H`` by
            the caller.
        _config: block sizes for the Triton kernels (testing/tuning only).

    Returns:
        Tensor ``[B, H, T, hs]`` equal to
        ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``.

    The Triton kernels (forward and backward) are used when Triton is
    importable, the tensors are on CUDA (or on the CPU with TRITON_INTERPRET=1
    set before import), the dtype is fp16, bf16 or fp32 and ``hs <= 128``.
    Anything else, float64 included, goes to PyTorch's SDPA.

    Raises:
        ValueError: if an input is not 4-D, or the shapes, dtypes or devices
            of ``k``/``v`` disagree with ``q``.
    """
    _validate(q, k, v)
    if not _use_triton(q):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    cfg = _config or _default_config(q.dtype, _block_d(q.shape[-1]), INTERPRET)
    cfg.check()
    return _FlashAttentionFunction.apply(q, k, v, cfg)


# %% [markdown]
# ## The multi-exit cross-entropy: fallback, backward, launch
#
# The torch fallback is the kernels' algorithm in torch, a chunk of tokens (for every exit) at a
# time: the forward keeps only the log-sum-exp, the backward recomputes each chunk's logits. It
# serves float64 (exactly: $10^{-12}$ against the plain computation) and machines without Triton.

# %%
#| export kernels.cross_entropy
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from looplm.kernels.runtime import INTERPRET, next_power_of_2, runs_in_triton, tl, triton


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _auto_chunk(S: int, V: int) -> int:
    # About 2**24 logits (64 MiB in float32) per chunk.
    return max(1, (1 << 24) // max(1, S * V))


class _TorchChunkedLCE(torch.autograd.Function):
    """Same maths as the Triton kernels, ``chunk`` tokens (all exits) at a time.

    Forward keeps only ``lse``; backward recomputes each chunk's logits, so
    at most ``S * chunk * V`` logits exist at any moment.
    """

    @staticmethod
    def forward(ctx, states, weight, targets, ignore_index, chunk):
        S, N, _ = states.shape
        cdt = _compute_dtype(states.dtype)
        w = weight.to(cdt)
        loss = torch.zeros((S, N), device=states.device, dtype=cdt)
        lse = torch.empty((S, N), device=states.device, dtype=cdt)
        for n0 in range(0, N, chunk):
            n1 = min(N, n0 + chunk)
            z = states[:, n0:n1].to(cdt) @ w.T  # [S, c, V]
            t = targets[n0:n1]
            valid = t != ignore_index
            safe_t = torch.where(valid, t, torch.zeros_like(t))
            lse_c = torch.logsumexp(z, dim=-1)
            z_t = z.gather(-1, safe_t.view(1, -1, 1).expand(S, -1, 1)).squeeze(-1)
            loss[:, n0:n1] = torch.where(valid, lse_c - z_t, torch.zeros_like(z_t))
            lse[:, n0:n1] = lse_c
        ctx.save_for_backward(states, weight, targets, lse)
        ctx.ignore_index = ignore_index
        ctx.chunk = chunk
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        states, weight, targets, lse = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        S, N, D = states.shape
        cdt = lse.dtype
        w = weight.to(cdt)
        dx = torch.zeros((S, N, D), device=states.device, dtype=cdt) if need_dx else None
        dw = torch.zeros_like(w) if need_dw else None
        if need_dx or need_dw:
            for n0 in range(0, N, ctx.chunk):
                n1 = min(N, n0 + ctx.chunk)
                x = states[:, n0:n1].to(cdt)
                t = targets[n0:n1]
                valid = t != ctx.ignore_index
                safe_t = torch.where(valid, t, torch.zeros_like(t))
                g = grad_loss[:, n0:n1].to(cdt) * valid.to(cdt)  # [S, c]
                dz = torch.exp(x @ w.T - lse[:, n0:n1, None])  # softmax
                idx = safe_t.view(1, -1, 1).expand(S, -1, 1)
                dz.scatter_add_(-1, idx, -valid.to(cdt).view(1, -1, 1).expand(S, -1, 1))
                dz *= g[..., None]
                if need_dx:
                    dx[:, n0:n1] = dz @ w
                if need_dw:
                    dw += dz.reshape(-1, dz.shape[-1]).T @ x.reshape(-1, D)
        d_states = dx.to(states.dtype) if need_dx else None
        d_weight = dw.to(weight.dtype) if need_dw else None
        return d_states, d_weight, None, None, None


# %% [markdown]
# The backward kernel of section 10.6: one program per tile of (exit, token) rows by vocabulary
# columns; it recomputes the tile's logits, forms $(\mathrm{softmax} - \mathrm{onehot})\,g$, and adds
# both gradient products into float32 buffers with atomic adds.

# %%
#| export kernels.cross_entropy
@triton.jit
def _lce_bwd_kernel(
    x_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, dx_ptr, dw_ptr,
    S, N, V, D,
    stride_xs, stride_xn, stride_xd,
    stride_wv, stride_wd,
    stride_t,
    stride_ls, stride_ln,
    stride_gs, stride_gn,
    stride_dxs, stride_dxn,
    stride_dwv,
    ignore_index,
    S_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    """One program: a (S*BLOCK_N rows) x (BLOCK_V columns) logit tile.

    dx (float32, [S, N, D], last dim contiguous) and dw (float32, [V, D],
    contiguous) receive this tile's contributions by atomic addition.
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)

    rows = tl.arange(0, S_PAD * BLOCK_N)
    s_idx = rows // BLOCK_N
    n_idx = pid_n * BLOCK_N + rows % BLOCK_N
    n_ok = n_idx < N
    row_ok = (s_idx < S) & n_ok
    s64 = s_idx.to(tl.int64)
    n64 = n_idx.to(tl.int64)
    x_rows = x_ptr + s64 * stride_xs + n64 * stride_xn

    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    cols64 = cols.to(tl.int64)
    w_cols = w_ptr + cols64 * stride_wv

    tgt = tl.load(t_ptr + n64 * stride_t, mask=n_ok, other=ignore_index)
    lse = tl.load(lse_ptr + s64 * stride_ls + n64 * stride_ln, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + s64 * stride_gs + n64 * stride_gn, mask=row_ok, other=0.0)
    g = tl.where(row_ok & (tgt != ignore_index), g.to(tl.float32), 0.0)

    d_base = tl.arange(0, BLOCK_D)

    # Recompute the logit tile.
    z = tl.zeros([S_PAD * BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_idx = d0 + d_base
        d_ok = d_idx < D
        x = tl.load(
            x_rows[:, None] + d_idx[None, :] * stride_xd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        w_t = tl.load(
            w_cols[None, :] + d_idx[:, None] * stride_wd,
            mask=d_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        z = tl.dot(x, w_t, z, input_precision=DOT_PRECISION)

    # softmax - onehot(target); padded columns contribute nothing.
    p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)
    delta = p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)

    in_ty = x_ptr.dtype.element_ty

    if COMPUTE_DX:
        # d_states rows are scaled by g after the product, so the
        # operand (values in [-1, 1]) cannot underflow in 16-bit formats.
        delta_x = delta.to(in_ty)
        for d0 in range(0, D, BLOCK_D):
            d_idx = d0 + d_base
            d_ok = d_idx < D
            w = tl.load(  # [BLOCK_V, BLOCK_D]
                w_cols[:, None] + d_idx[None, :] * stride_wd,
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            part = tl.dot(delta_x, w, input_precision=DOT_PRECISION) * g[:, None]
            tl.atomic_add(
                dx_ptr + s64[:, None] * stride_dxs + n64[:, None] * stride_dxn + d_idx[None, :],
                part,
                mask=row_ok[:, None] & d_ok[None, :],
                sem="relaxed",
            )

    if COMPUTE_DW:
        # d_weight sums over rows with different g, so g must enter the
        # operand; dividing by the tile's largest |g| keeps the operand in
        # [-1, 1] (no 16-bit underflow for small loss scales) and the
        # factor is multiplied back in float32.
        g_max = tl.max(tl.abs(g), axis=0)
        g_scale = tl.where(g_max > 0.0, g_max, 1.0)
        delta_w = tl.trans((delta * (g / g_scale)[:, None]).to(in_ty))  # [BLOCK_V, rows]
        for d0 in range(0, D, BLOCK_D):
            d_idx = d0 + d_base
            d_ok = d_idx < D
            x = tl.load(
                x_rows[:, None] + d_idx[None, :] * stride_xd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            part = tl.dot(delta_w, x, input_precision=DOT_PRECISION) * g_scale
            tl.atomic_add(
                dw_ptr + cols64[:, None] * stride_dwv + d_idx[None, :],
                part,
                mask=col_ok[:, None] & d_ok[None, :],
                sem="relaxed",
            )


# %% [markdown]
# The launch code chooses tiles (the smallest legal ones under the interpreter, where every
# block operation costs the same, and on a GPU about 128 rows by 128 vocabulary columns in 16-bit,
# smaller in float32, whose exact products run without tensor cores and need more registers),
# and the public function checks its inputs and dispatches:

# %%
#| export kernels.cross_entropy
def _launch_config(s_tile: int, N: int, V: int, D: int, dtype: torch.dtype, interpreted: bool) -> dict:
    """Block sizes for a tile holding ``s_tile`` exits.

    Each tile has ``S_PAD * BLOCK_N`` rows (``S_PAD`` = ``s_tile`` rounded up
    to a power of two).  On a GPU, for 16-bit inputs the forward tile is ~128
    rows x 128 vocabulary columns and the backward tile ~64 x 128, with
    ``BLOCK_D = 64``; for float32 they are ~64 x 128 and ~32 x 128 with
    ``BLOCK_D = 32``.
    Under the interpreter the cost is per program and per operation, so the
    tiles are the smallest legal ones (every dot dimension >= 16).
    """
    s_pad = next_power_of_2(s_tile)
    if interpreted:
        fwd_rows, bwd_rows, block_v, block_d = 16, 16, 16, 16
        num_warps = 4
    else:
        block_v, num_warps = 128, 8
        if dtype == torch.float32:
            # IEEE fp32 products run on the FMA units and hold their operands
            # in registers: smaller tiles avoid register spills.
            fwd_rows, bwd_rows, block_d = 64, 32, 32
        else:
            fwd_rows, bwd_rows, block_d = 128, 64, 64
    block_v = max(16, min(block_v, next_power_of_2(V)))
    block_d = max(16, min(block_d, next_power_of_2(D)))

    def block_n_for(rows: int) -> int:
        bn = max(1, rows // s_pad)
        bn = min(bn, next_power_of_2(N))
        # Every dot needs >= 16 along each dimension, including the row one
        # (it is the reduction dimension of the d_weight product).
        return max(bn, -(-16 // s_pad))

    return dict(
        S_PAD=s_pad,
        BLOCK_N_FWD=block_n_for(fwd_rows),
        BLOCK_N_BWD=block_n_for(bwd_rows),
        BLOCK_V=block_v,
        BLOCK_D=block_d,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )


def _exit_groups(S: int):
    for s0 in range(0, S, _MAX_EXITS_PER_TILE):
        yield s0, min(S, s0 + _MAX_EXITS_PER_TILE)


# --------------------------------------------------------------------------
# Triton host code
# --------------------------------------------------------------------------


def _triton_forward(states, weight, targets, ignore_index) -> Tuple[torch.Tensor, torch.Tensor]:
    S, N, D = states.shape
    V = weight.shape[0]
    loss = torch.empty((S, N), device=states.device, dtype=torch.float32)
    lse = torch.empty((S, N), device=states.device, dtype=torch.float32)
    if S == 0 or N == 0:
        return loss, lse
    for s0, s1 in _exit_groups(S):
        x = states[s0:s1]
        cfg = _launch_config(s1 - s0, N, V, D, states.dtype, INTERPRET)
        lo, ls = loss[s0:s1], lse[s0:s1]
        grid = (triton.cdiv(N, cfg["BLOCK_N_FWD"]),)
        _lce_fwd_kernel[grid](
            x, weight, targets, lo, ls,
            s1 - s0, N, V, D,
            x.stride(0), x.stride(1), x.stride(2),
            weight.stride(0), weight.stride(1),
            targets.stride(0),
            lo.stride(0), lo.stride(1),
            ignore_index,
            S_PAD=cfg["S_PAD"],
            BLOCK_N=cfg["BLOCK_N_FWD"],
            BLOCK_V=cfg["BLOCK_V"],
            BLOCK_D=cfg["BLOCK_D"],
            DOT_PRECISION=cfg["DOT_PRECISION"],
            num_warps=cfg["num_warps"],
        )
    return loss, lse


def _triton_backward(states, weight, targets, lse, grad, ignore_index, need_dx, need_dw):
    S, N, D = states.shape
    V = weight.shape[0]
    dx = torch.zeros((S, N, D), device=states.device, dtype=torch.float32) if need_dx else None
    dw = torch.zeros((V, D), device=states.device, dtype=torch.float32) if need_dw else None
    if S > 0 and N > 0 and (need_dx or need_dw):
        # Unused buffers are never touched; any float32 tensor can stand in.
        dx_arg = dx if need_dx else lse.new_empty((1, 1, 1))
        dw_arg = dw if need_dw else lse.new_empty((1, 1))
        for s0, s1 in _exit_groups(S):
            x, ls, g = states[s0:s1], lse[s0:s1], grad[s0:s1]
            dxg = dx_arg[s0:s1] if need_dx else dx_arg
            cfg = _launch_config(s1 - s0, N, V, D, states.dtype, INTERPRET)
            grid = (triton.cdiv(N, cfg["BLOCK_N_BWD"]), triton.cdiv(V, cfg["BLOCK_V"]))
            _lce_bwd_kernel[grid](
                x, weight, targets, ls, g, dxg, dw_arg,
                s1 - s0, N, V, D,
                x.stride(0), x.stride(1), x.stride(2),
                weight.stride(0), weight.stride(1),
                targets.stride(0),
                ls.stride(0), ls.stride(1),
                g.stride(0), g.stride(1),
                dxg.stride(0), dxg.stride(1),
                dw_arg.stride(0),
                ignore_index,
                S_PAD=cfg["S_PAD"],
                BLOCK_N=cfg["BLOCK_N_BWD"],
                BLOCK_V=cfg["BLOCK_V"],
                BLOCK_D=cfg["BLOCK_D"],
                DOT_PRECISION=cfg["DOT_PRECISION"],
                COMPUTE_DX=need_dx,
                COMPUTE_DW=need_dw,
                num_warps=cfg["num_warps"],
            )
    d_states = dx.to(states.dtype) if need_dx else None
    d_weight = dw.to(weight.dtype) if need_dw else None
    return d_states, d_weight


class _TritonMultiExitLCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, weight, targets, ignore_index):
        loss, lse = _triton_forward(states, weight, targets, ignore_index)
        ctx.save_for_backward(states, weight, targets, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        states, weight, targets, lse = ctx.saved_tensors
        d_states, d_weight = _triton_backward(
            states, weight, targets, lse, grad_loss, ctx.ignore_index,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        return d_states, d_weight, None, None


# %% [markdown]
# The input checks (each error names the argument) and the public function, which dispatches to
# the kernels or to the fallback:

# %%
#| export kernels.cross_entropy
def _check_inputs(states, weight, targets, ignore_index) -> None:
    for name, t in (("states", states), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if states.dim() != 3:
        raise ValueError(f"states must be 3-D [S, N, D], got shape {tuple(states.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if not states.dtype.is_floating_point:
        raise TypeError(f"states must be a floating-point tensor, got dtype {states.dtype}")
    if states.dtype != weight.dtype:
        raise TypeError(
            f"states and weight must have the same dtype, got states.dtype={states.dtype} "
            f"and weight.dtype={weight.dtype}"
        )
    S, N, D = states.shape
    V, Dw = weight.shape
    if Dw != D:
        raise ValueError(
            f"hidden size mismatch: states has D={D} (shape {tuple(states.shape)}) but "
            f"weight has D={Dw} (shape {tuple(weight.shape)})"
        )
    if V == 0:
        raise ValueError("weight must have at least one vocabulary row (V > 0)")
    if targets.dim() != 1 or targets.shape[0] != N:
        raise ValueError(
            f"targets must have shape [N] = [{N}] to match states {tuple(states.shape)}, "
            f"got shape {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if states.device != weight.device or states.device != targets.device:
        raise ValueError(
            f"states, weight and targets must be on one device, got {states.device}, "
            f"{weight.device} and {targets.device}"
        )


def _check_target_range(targets, V, ignore_index) -> None:
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets[{i}] = {int(targets[i])} is outside [0, {V}) and is not ignore_index={ignore_index}"
        )


def multi_exit_linear_cross_entropy_torch(
    states: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk: Optional[int] = None,
) -> torch.Tensor:
    """PyTorch reference for :func:`multi_exit_linear_cross_entropy`.

    Processes ``chunk`` tokens (for all exits) at a time; ``chunk=None`` picks
    one that keeps about 2**24 logits alive.  Computes in float64 for float64
    inputs and in float32 otherwise; returns ``[S, N]`` in that dtype.
    Differentiable (once) w.r.t. ``states`` and ``weight``.
    """
    _check_inputs(states, weight, targets, ignore_index)
    S, N, _ = states.shape
    V = weight.shape[0]
    if chunk is None:
        chunk = _auto_chunk(S, V)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    targets = targets.long()
    _check_target_range(targets, V, ignore_index)
    return _TorchChunkedLCE.apply(states, weight, targets, ignore_index, chunk)


def multi_exit_linear_cross_entropy(
    states: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token cross-entropy of every exit of a looped LM through one head.

    Args:
        states: ``[S, N, D]`` normed readout states of ``S`` loop steps for
            the same ``N`` tokens.
        weight: ``[V, D]`` LM-head weight shared by all exits (same dtype).
        targets: ``[N]`` integer next-token ids, shared by all exits.
        ignore_index: target value whose rows get loss 0 and no gradient.

    Returns:
        ``[S, N]`` losses, float32 (float64 for float64 inputs), equal to
        ``F.cross_entropy((states @ weight.T).float().reshape(S * N, V),
        targets.repeat(S), ignore_index=ignore_index,
        reduction="none").view(S, N)`` but without forming the ``[S, N, V]``
        logits.  (For 16-bit inputs the logits are accumulated and kept in
        float32 instead of being rounded to the input dtype, so the result is
        slightly closer to the exact value than that expression.)  Differentiable w.r.t. ``states`` and ``weight`` for any
        upstream gradient ``[S, N]``:
        ``dz[s, n, v] = (softmax(z[s, n])[v] - [v == targets[n]]) * g[s, n]``.

    Dispatch: the Triton kernels run for float16 / bfloat16 / float32 tensors
    on CUDA, and for float16 / float32 CPU tensors when the kernels were built
    by the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton was
    first imported).  Everything else uses
    :func:`multi_exit_linear_cross_entropy_torch`.

    On CUDA the targets are not range-checked (that would synchronise the
    device); a non-ignored target outside ``[0, V)`` yields ``loss = lse`` and
    a gradient without the one-hot term.  The d_weight / d_states sums use
    float32 atomic additions, so their last bits may vary between runs.
    """
    _check_inputs(states, weight, targets, ignore_index)
    if not runs_in_triton(states, weight):
        return multi_exit_linear_cross_entropy_torch(states, weight, targets, ignore_index)
    V = weight.shape[0]
    targets = targets.long()
    if targets.device.type == "cpu":
        _check_target_range(targets, V, ignore_index)
    return _TritonMultiExitLCE.apply(states, weight, targets, ignore_index)



# %% [markdown]
# ## The tests
#
# Every kernel forward and backward against float64, on shapes that are not powers of two, with
# masked rows and `ignore_index`; its fallback; its errors. Then the model switch: the kernel model
# against the torch model on six layouts, without logits under truncation and checkpointing,
# float16, ten training steps, the masked step, decoding, the plan, and `import looplm` without
# Triton. Tolerances: $10^{-5}$ relative in float32, $4\epsilon$ of the dtype otherwise.

# %% tags=["remove-cell"]
#| test
import math
import os

import pytest
import torch
import torch.nn.functional as F

from looplm.kernels.runtime import INTERPRET, runs_in_triton
from looplm.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference
from looplm.kernels.update import masked_update, masked_update_reference

# The interpreter runs CPU tensors in float32 and float16; natively on a GPU, bfloat16 too.
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())
needs_kernels = pytest.mark.skipif(not runs_in_triton(torch.zeros(1, device=DEVICE)),
                                   reason="needs Triton, with a GPU or TRITON_INTERPRET=1")


def relative_error(got, want):
    diff, scale = (got.double() - want.double()).abs().max().item(), want.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def tolerance(dtype):
    """1e-5 in float32; 4 roundings of the dtype otherwise (4 eps: 3.9e-3 float16, 3.1e-2 bfloat16)."""
    return 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps


def check_against_float64(fn, reference, inputs, dtype, upstream, differentiable):
    """Run fn on `inputs` cast to dtype and reference on them in float64; backpropagate the same
    upstream gradients through the outputs; assert outputs and gradients agree within tolerance."""
    def run(f, dt):
        args = [t.to(DEVICE, dt, copy=True).requires_grad_(d) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                for t, d in zip(inputs, differentiable)]
        outs = f(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        sum(((o.double() * g.to(DEVICE)).sum() for o, g in zip(outs, upstream))).backward()
        return list(outs) + [a.grad for a, d in zip(args, differentiable) if d]

    got, want = run(fn, dtype), run(reference, torch.float64)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype and a.shape == b.shape, (i, a.dtype, a.shape, b.shape)
        assert relative_error(a, b) <= tolerance(dtype), (i, dtype, relative_error(a, b))


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 7, 24), (50, 130), (1, 1, 8), (2, 33, 96)])
@pytest.mark.parametrize("with_injection", [True, False])
def test_add_rmsnorm_matches_the_reference_forward_and_backward(shape, with_injection):
    g = torch.Generator().manual_seed(sum(shape))
    h, inj, gu, gy = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    w = 1 + 0.1 * torch.randn(shape[-1], generator=g, dtype=torch.float64)
    for dtype in DTYPES:
        if with_injection:
            check_against_float64(lambda a, b, c: add_rmsnorm(a, b, c, 1e-6),
                                  lambda a, b, c: add_rmsnorm_reference(a, b, c, 1e-6),
                                  (h, inj, w), dtype, (gu, gy), (True, True, True))
        else:
            check_against_float64(lambda a, c: add_rmsnorm(a, None, c, 1e-6)[1],
                                  lambda a, c: add_rmsnorm_reference(a, None, c, 1e-6)[1],
                                  (h, w), dtype, (gy,), (True, True))


@needs_kernels
def test_add_rmsnorm_runs_the_kernel_and_equals_f_rms_norm():
    calls = []
    from looplm.kernels import rmsnorm
    original = rmsnorm.AddRMSNormFunction.apply
    try:
        rmsnorm.AddRMSNormFunction.apply = lambda *a: calls.append(1) or original(*a)
        x, w = torch.randn(6, 40, device=DEVICE), torch.rand(40, device=DEVICE) + 0.5
        _, y = add_rmsnorm(x, None, w, 1e-6)
    finally:
        rmsnorm.AddRMSNormFunction.apply = original
    assert calls == [1]
    assert relative_error(y, F.rms_norm(x.double(), (40,), w.double(), 1e-6)) <= 1e-6


def test_add_rmsnorm_falls_back_in_float64_and_refuses_bad_shapes():
    h = torch.randn(4, 10, dtype=torch.float64)
    w = torch.ones(10, dtype=torch.float64)
    u, y = add_rmsnorm(h, h, w, 1e-6)
    assert torch.equal(y, add_rmsnorm_reference(h, h, w, 1e-6)[1])
    with pytest.raises(ValueError, match="inj"):
        add_rmsnorm(h, h[:, :5], w, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        add_rmsnorm(h, None, w[:5], 1e-6)


run_tests(test_add_rmsnorm_runs_the_kernel_and_equals_f_rms_norm,
          test_add_rmsnorm_falls_back_in_float64_and_refuses_bad_shapes)

# %% tags=["remove-cell"]
#| test
from looplm.kernels.swiglu import swiglu, swiglu_reference


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 5, 77), (1025,), (2, 1, 1)])
def test_swiglu_matches_the_reference_forward_and_backward(shape):
    gen = torch.Generator().manual_seed(len(shape))
    g, u, up = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 for _ in range(3))
    for dtype in DTYPES:
        check_against_float64(swiglu, swiglu_reference, (g, u), dtype, (up,), (True, True))


def test_swiglu_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="one shape"):
        swiglu(torch.zeros(3), torch.zeros(4))


run_tests(test_swiglu_refuses_mismatched_inputs)

# %% tags=["remove-cell"]
#| test
from looplm.block import apply_rope, rope_angles
from looplm.kernels.rope import RopeFunction, rope


@needs_kernels
@pytest.mark.parametrize("B,H,T,hs,per_row", [(2, 3, 11, 12, False), (1, 2, 5, 6, True), (3, 1, 1, 40, True)])
def test_rope_matches_apply_rope_forward_and_backward(B, H, T, hs, per_row):
    g = torch.Generator().manual_seed(T)
    qkv = torch.randn(B, T, 3 * H * hs, generator=g, dtype=torch.float64)
    q = qkv[..., : H * hs].view(B, T, H, hs).transpose(1, 2)
    cos, sin = rope_angles(hs, 32, dtype=torch.float64)
    if per_row:
        positions = torch.randint(0, 32, (B, T), generator=g)
        cos, sin = cos[positions], sin[positions]
    else:
        cos, sin = cos[:T], sin[:T]
    up = torch.randn(q.shape, generator=g, dtype=torch.float64)
    for dtype in DTYPES:
        check_against_float64(lambda x: rope(x, cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)),
                              lambda x: apply_rope(x, cos.to(DEVICE), sin.to(DEVICE)), (q,), dtype, (up,), (True,))


@needs_kernels
def test_rope_backward_is_the_inverse_rotation():
    q = torch.randn(1, 2, 7, 8, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_angles(8, 7))
    y = RopeFunction.apply(q.requires_grad_(), cos, sin)
    (dx,) = torch.autograd.grad(y, q, y)               # the transpose applied to y gives q back
    assert relative_error(dx, q) <= 1e-6


def test_rope_bad_tables_get_apply_ropes_error():
    with pytest.raises(ValueError, match="positions"):
        rope(torch.randn(1, 2, 9, 8), *rope_angles(8, 4))


run_tests(test_rope_backward_is_the_inverse_rotation, test_rope_bad_tables_get_apply_ropes_error)

# %% tags=["remove-cell"]
#| test
from looplm.kernels import attention
from looplm.kernels.attention import flash_attention


def attention_float64(q, k, v):
    q, k, v = (x.double() for x in (q, k, v))
    T = q.shape[-2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s.softmax(-1) @ v


SMALL_BLOCKS = attention._Config(16, 16, 16, 16, 16, 16, num_warps=4, num_stages=1)
MIXED_BLOCKS = attention._Config(32, 16, 32, 16, 32, 16, num_warps=4, num_stages=1)


def _attention_case(shape, dtype, config=None, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make():
        x = torch.randn(shape, generator=g).to(DEVICE, dtype)
        if strided:                                  # [B, T, H, hs] memory seen as [B, H, T, hs]
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return x.requires_grad_()

    q, k, v = make(), make(), make()
    up = torch.randn(shape, generator=g).to(DEVICE, dtype)
    calls = []
    original = attention._FlashAttentionFunction.apply
    attention._FlashAttentionFunction.apply = lambda *a: calls.append(1) or original(*a)
    try:
        out = flash_attention(q, k, v, _config=config)
    finally:
        attention._FlashAttentionFunction.apply = original
    assert calls, "the kernel did not run"
    grads = torch.autograd.grad(out, (q, k, v), up)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_float64(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), up.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert a.dtype == dtype and a.shape == b.shape
        assert relative_error(a, b) <= tolerance(dtype), (name, dtype, relative_error(a, b))


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 3, 13, 8), (2, 3, 13, 24), (1, 2, 1, 8), (1, 2, 37, 16)])
def test_flash_attention_matches_float64_forward_and_backward(shape):
    for dtype in DTYPES:
        _attention_case(shape, dtype)


@needs_kernels
@pytest.mark.parametrize("config", [SMALL_BLOCKS, MIXED_BLOCKS], ids=["small", "mixed"])
def test_flash_attention_block_sizes_and_strided_inputs(config):
    _attention_case((1, 2, 45, 16), torch.float32, config=config, seed=1)
    _attention_case((2, 2, 20, 12), torch.float32, strided=True, seed=2)


def test_flash_attention_falls_back_in_float64_and_refuses_bad_shapes():
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    assert torch.equal(flash_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with pytest.raises(ValueError, match="4-D"):
        flash_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="k must have the same shape"):
        flash_attention(q, k[:, :1], v)


run_tests(test_flash_attention_falls_back_in_float64_and_refuses_bad_shapes)

# %% tags=["remove-cell"]
#| test
from looplm.kernels import cross_entropy as ce
from looplm.kernels.cross_entropy import (multi_exit_cross_entropy_reference, multi_exit_linear_cross_entropy,
                                          multi_exit_linear_cross_entropy_torch)


def _ce_inputs(S, N, D, V, dtype, seed=0, ignore=(), ignore_index=-100, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    states = (scale * torch.randn(S, N, D, generator=gen)).to(dtype)
    weight = (torch.randn(V, D, generator=gen) / D**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    for i in ignore:
        targets[i] = ignore_index
    return states.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), torch.randn(S, N, generator=gen).to(DEVICE)


def _ce_run(fn, states, weight, targets, upstream, ignore_index=-100, **kw):
    x, w = states.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(x, w, targets, ignore_index=ignore_index, **kw)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad, w.grad


def _ce_check(fn, S, N, D, V, dtype, **options):
    ignore_index = options.pop("ignore_index", -100)
    states, weight, targets, up = _ce_inputs(S, N, D, V, dtype, ignore_index=ignore_index, **options)
    got = _ce_run(fn, states, weight, targets, up, ignore_index)
    want = _ce_run(multi_exit_cross_entropy_reference, states.double(), weight.double(), targets, up.double(),
                   ignore_index)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    grad_tolerance = 1e-12 if dtype == torch.float64 else tolerance(dtype)
    assert relative_error(got[0], want[0]) <= (1e-12 if dtype == torch.float64 else 1e-5)
    assert relative_error(got[1], want[1]) <= grad_tolerance
    assert relative_error(got[2], want[2]) <= grad_tolerance
    ignored = (targets == ignore_index).cpu()
    assert (got[0][:, ignored] == 0).all() and (got[1][:, ignored] == 0).all()
    return got


@needs_kernels
@pytest.mark.parametrize("S,N,D,V", [(3, 13, 24, 53), (1, 20, 17, 33), (18, 3, 16, 20), (4, 9, 70, 150)])
def test_multi_exit_cross_entropy_matches_float64_with_any_upstream_gradient(S, N, D, V):
    for dtype in DTYPES:
        _ce_check(multi_exit_linear_cross_entropy, S, N, D, V, dtype, ignore=(2, N - 1))


@needs_kernels
@pytest.mark.parametrize("ignore_index", [5, -1])
def test_multi_exit_cross_entropy_custom_ignore_index(ignore_index):
    # 5 lies inside the vocabulary: those positions must still be ignored
    _ce_check(multi_exit_linear_cross_entropy, 2, 11, 20, 37, torch.float32, seed=1, ignore=(0, 4, 10),
              ignore_index=ignore_index)


@needs_kernels
def test_multi_exit_cross_entropy_large_logits_strided_inputs_and_reductions():
    _ce_check(multi_exit_linear_cross_entropy, 2, 9, 32, 45, torch.float32, seed=4, scale=40.0)   # logits ~100
    states, weight, targets, up = _ce_inputs(3, 10, 24, 40, torch.float32, seed=5)
    strided = states.transpose(0, 1).contiguous().transpose(0, 1), weight.T.contiguous().T
    got = _ce_run(multi_exit_linear_cross_entropy, *strided, targets, up)
    want = _ce_run(multi_exit_cross_entropy_reference, states.double(), weight.double(), targets, up.double())
    assert all(relative_error(a, b) <= 1e-5 for a, b in zip(got, want))
    for reduce in (torch.sum, torch.mean):                  # stride-0 and small upstream gradients
        x, w = states.clone().requires_grad_(), weight.clone().requires_grad_()
        reduce(multi_exit_linear_cross_entropy(x, w, targets)).backward()
        xr, wr = states.double().requires_grad_(), weight.double().requires_grad_()
        reduce(multi_exit_cross_entropy_reference(xr, wr, targets)).backward()
        assert relative_error(x.grad, xr.grad) <= 1e-5 and relative_error(w.grad, wr.grad) <= 1e-5


@needs_kernels
def test_multi_exit_cross_entropy_runs_the_kernel_on_gpu_tile_sizes(monkeypatch):
    calls = []
    original = ce._TritonMultiExitLCE.apply
    monkeypatch.setattr(ce._TritonMultiExitLCE, "apply", lambda *a: calls.append(1) or original(*a))
    if INTERPRET:                                           # the GPU's tiles, masked, in the interpreter
        real = ce._launch_config
        monkeypatch.setattr(ce, "_launch_config", lambda *a: real(*a[:-1], False))
    for dtype in (torch.float32, torch.float16):
        _ce_check(multi_exit_linear_cross_entropy, 3, 13, 70, 150, dtype, seed=9, ignore=(5,))
    assert len(calls) == 2


@needs_kernels
def test_multi_exit_cross_entropy_all_ignored_and_one_input_without_grad():
    states, weight, targets, up = _ce_inputs(2, 5, 16, 20, torch.float32, seed=8, ignore=range(5))
    loss, ds, dw = _ce_run(multi_exit_linear_cross_entropy, states, weight, targets, up)
    assert (loss == 0).all() and (ds == 0).all() and (dw == 0).all()
    states, weight, targets, up = _ce_inputs(2, 6, 16, 24, torch.float32, seed=7)
    _, want_ds, want_dw = _ce_run(multi_exit_cross_entropy_reference, states.double(), weight.double(), targets,
                                  up.double())
    x = states.clone().requires_grad_()
    (multi_exit_linear_cross_entropy(x, weight, targets) * up).sum().backward()
    w = weight.clone().requires_grad_()
    (multi_exit_linear_cross_entropy(states, w, targets) * up).sum().backward()
    assert relative_error(x.grad, want_ds) <= 1e-5 and relative_error(w.grad, want_dw) <= 1e-5


@pytest.mark.parametrize("chunk", [None, 4, 1])
def test_the_chunked_torch_fallback_is_exact_in_float64(chunk):
    _ce_check(lambda *a, **k: multi_exit_linear_cross_entropy_torch(*a, chunk=chunk, **k), 3, 13, 24, 53,
              torch.float64, seed=11, ignore=(1, 12))
    _ce_check(multi_exit_linear_cross_entropy, 2, 9, 12, 19, torch.float64, seed=12, ignore=(0,), ignore_index=3)


def test_multi_exit_cross_entropy_refuses_bad_input():
    fn = multi_exit_linear_cross_entropy
    x, w, t = torch.randn(2, 4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    for args, error, match in [((x[0], w, t), ValueError, "states must be 3-D"),
                               ((x, w[None], t), ValueError, "weight must be 2-D"),
                               ((x, torch.randn(10, 9), t), ValueError, "hidden size mismatch"),
                               ((x, w, t[:3]), ValueError, r"targets must have shape \[N\]"),
                               ((x, w, t.float()), TypeError, "targets must be an integer tensor"),
                               ((x, w.double(), t), TypeError, "same dtype"),
                               ((x, w, torch.tensor([0, 1, 10, 2])), ValueError, "outside")]:
        with pytest.raises(error, match=match):
            fn(*args)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fn(x, w, t, ignore_index=1.5)
    with pytest.raises(ValueError, match="chunk must be"):
        multi_exit_linear_cross_entropy_torch(x, w, t, chunk=0)


run_tests(test_multi_exit_cross_entropy_refuses_bad_input)

# %% tags=["remove-cell"]
#| test
@needs_kernels
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_kernel_on_random_shapes(seed):
    """Shapes drawn at random (mostly not powers of two), float32, forward and backward."""
    g = torch.Generator().manual_seed(100 + seed)
    draw = lambda low, high: int(torch.randint(low, high + 1, (), generator=g))
    B, T, H, hs, D, V, S = draw(1, 3), draw(1, 40), draw(1, 3), 2 * draw(1, 20), draw(3, 90), draw(2, 70), draw(1, 5)
    x = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    check_against_float64(lambda a, b, c: add_rmsnorm(a, b, c, 1e-6), lambda a, b, c: add_rmsnorm_reference(a, b, c, 1e-6),
                          (x(B, T, D), x(B, T, D), x(D)), torch.float32, (x(B, T, D), x(B, T, D)), (True,) * 3)
    check_against_float64(swiglu, swiglu_reference, (x(B, T, D), x(B, T, D)), torch.float32, (x(B, T, D),),
                          (True, True))
    cos, sin = rope_angles(hs, T, dtype=torch.float64)
    check_against_float64(lambda q: rope(q, cos.to(DEVICE, torch.float32), sin.to(DEVICE, torch.float32)),
                          lambda q: apply_rope(q, cos.to(DEVICE), sin.to(DEVICE)), (x(B, H, T, hs),), torch.float32,
                          (x(B, H, T, hs),), (True,))
    if hs <= 128:
        _attention_case((B, H, T, hs), torch.float32, seed=seed)
    _ce_check(multi_exit_linear_cross_entropy, S, T, D, V, torch.float32, seed=seed, ignore=(T - 1,))
    h, a, d = x(B, T, D), x(B, T, D), x(B, T, D)
    active = torch.rand(B, T, generator=g) < 0.5
    got = masked_update(*(t.to(DEVICE, torch.float32) for t in (h, a, d)), active.to(DEVICE))
    assert relative_error(got, masked_update_reference(h, a, d, active).to(DEVICE)) <= 1e-6

# %% tags=["remove-cell"]
#| test
from looplm.kernels.loop import KernelLoopLM, kernel_plan, use_kernels
from looplm.model import LoopLM, LoopLMConfig

TINY = dict(vocab_size=37, d_model=32, n_heads=2, n_loops=3, max_seq_len=32)
ADDITIVE = dict(injection="add", init_state="zeros", n_prelude=1, n_coda=1, exit_gate=True)


def _model_pair(options, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    reference = LoopLM(LoopLMConfig(**TINY, **options)).to(DEVICE, dtype)
    fast = LoopLM(LoopLMConfig(**TINY, **options, kernels="triton")).to(DEVICE, dtype)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _outputs_and_grads(model, idx, targets, **kwargs):
    out = model(idx, targets, generator=torch.Generator().manual_seed(1), **kwargs)
    weights = torch.linspace(0.2, 1.0, out.step_losses.shape[0], device=DEVICE)[:, None, None]
    (out.step_losses * weights).sum().backward()
    return out, [p.grad for p in model.parameters()]


@needs_kernels
@pytest.mark.parametrize("layout", [ADDITIVE, dict(), dict(injection="concat", init_state="random", norm_style="huginn",
                                                            qk_bias=True, n_coda=1, norm_before_coda=True),
                                    dict(norm_style="sandwich", feedback_norm=True), dict(n_kv_heads=2, n_core=2),
                                    dict(injection="add", mlp="moe", n_experts=4, top_k=2)],
                         ids=["additive", "default", "huginn", "ouro", "gqa", "moe"])
def test_the_kernel_model_matches_the_torch_model(layout):
    reference, fast = _model_pair(layout)
    assert isinstance(fast, KernelLoopLM) and list(fast.state_dict()) == list(reference.state_dict())
    g = torch.Generator().manual_seed(3)
    idx, targets = torch.randint(0, 37, (2, 11), generator=g).to(DEVICE), torch.randint(0, 37, (2, 11), generator=g).to(DEVICE)
    targets[1, :5] = -100
    a, grads_a = _outputs_and_grads(reference, idx, targets)
    b, grads_b = _outputs_and_grads(fast, idx, targets)
    for name in ("logits", "step_losses", "gate", "loss"):
        if getattr(a, name) is not None:
            assert relative_error(getattr(b, name), getattr(a, name)) <= 1e-5, name
    for (name, _), ga, gb in zip(reference.named_parameters(), grads_a, grads_b):
        if ga is not None:
            assert relative_error(gb, ga) <= 1e-5, name


@needs_kernels
def test_losses_without_logits_match_and_work_with_truncation_and_checkpointing():
    reference, fast = _model_pair(ADDITIVE, seed=2)
    g = torch.Generator().manual_seed(4)
    idx, targets = torch.randint(0, 37, (2, 9), generator=g).to(DEVICE), torch.randint(0, 37, (2, 9), generator=g).to(DEVICE)
    targets[0, :3] = -100
    for options in (dict(), dict(grad_steps=2), dict(checkpoint=True)):
        for model in (reference, fast):
            model.zero_grad()
        a, grads_a = _outputs_and_grads(reference, idx, targets, **options)
        b, grads_b = _outputs_and_grads(fast, idx, targets, return_logits=False, **options)
        assert b.logits is None and b.weighted_logits is None
        assert (b.step_losses[:, 0, :3] == 0).all()
        for name in ("step_losses", "gate", "exit_probs", "loss"):
            assert relative_error(getattr(b, name), getattr(a, name)) <= 1e-5, (options, name)
        for (name, _), ga, gb in zip(reference.named_parameters(), grads_a, grads_b):
            if ga is not None:
                assert relative_error(gb, ga) <= 1e-5, (options, name)


@needs_kernels
def test_float16_models_agree_within_the_dtypes_tolerance():
    reference, fast = _model_pair(ADDITIVE, seed=5, dtype=torch.float16)
    idx = torch.randint(0, 37, (2, 10), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():
        a, b = reference(idx), fast(idx)
    # a float16 model rounds every op's result; across ~20 ops the errors add up, hence 8 eps
    assert relative_error(b.logits, a.logits) <= 8 * torch.finfo(torch.float16).eps


@needs_kernels
def test_ten_training_steps_give_the_same_loss_curve():
    """One batch memorised for 10 AdamW steps, from one seed, on each path: the curves agree."""
    curves = []
    for kernels, kwargs in (("torch", {}), ("triton", dict(return_logits=False))):
        torch.manual_seed(0)
        model = LoopLM(LoopLMConfig(**TINY, injection="add", init_state="zeros", kernels=kernels)).to(DEVICE)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        idx = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        curve = []
        for _ in range(10):
            loss = model(idx[:, :-1], idx[:, 1:], **kwargs).step_losses.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves.append(curve)
    assert curves[0][-1] < curves[0][0] - 0.5                      # it learns
    assert max(abs(a - b) / b for a, b in zip(curves[1], curves[0])) <= 1e-4


@needs_kernels
def test_the_masked_step_keeps_exited_rows_and_equals_the_full_step_elsewhere():
    for layout in (ADDITIVE, dict(injection="concat", init_state="zeros")):
        _, fast = _model_pair(layout, seed=7)
        B, T = 3, 5
        x0, h = torch.randn(B, T, 32, device=DEVICE), torch.randn(B, T, 32, device=DEVICE)
        cos, sin = fast.rope(T)
        active = torch.rand(B, T, generator=torch.Generator().manual_seed(0)) < 0.5
        with torch.no_grad():
            full = fast.step(h, x0, cos, sin)
            masked = fast.step(h, x0, cos, sin, active=active.to(DEVICE))
        assert torch.equal(masked[~active], h[~active])
        assert relative_error(masked[active], full[active]) <= 1e-6


@needs_kernels
def test_decoding_with_the_kernel_model_gives_the_torch_models_tokens():
    from looplm.exits import QExit
    from looplm.generate import generate
    reference, fast = _model_pair(ADDITIVE, seed=8)
    prompts = [[1, 5, 7, 3], [2, 9]]
    a = generate(reference.eval(), prompts, 5, exit_rule=QExit(0.5))
    b = generate(fast.eval(), prompts, 5, exit_rule=QExit(0.5))
    assert torch.equal(a.new_tokens, b.new_tokens) and torch.equal(a.steps, b.steps)


def test_the_kernel_plan_reports_what_runs():
    torch.manual_seed(0)
    assert kernel_plan(LoopLM(LoopLMConfig(**TINY))) == [("everything", "torch: kernels='torch'")]
    model = LoopLM(LoopLMConfig(**TINY, kernels="triton")).double()
    assert kernel_plan(model) == [("everything", "torch: float64")]
    if runs_in_triton(torch.zeros(1, device=DEVICE)):
        plan = dict(kernel_plan(LoopLM(LoopLMConfig(**TINY, **ADDITIVE, kernels="triton")).to(DEVICE)))
        assert plan["injection + first norm of the step"].startswith("kernel")
        assert plan["MLP"] == "kernel: SwiGLU in 3 of 3 blocks"
        plan = dict(kernel_plan(LoopLM(LoopLMConfig(**TINY, injection="concat", qk_bias=True, norm_style="huginn",
                                                    kernels="triton")).to(DEVICE)))
        assert plan["injection + first norm of the step"] == "torch: injection='concat'"
        assert plan["rotary embedding"] == "torch: grouped-query attention"


def test_float64_kernel_models_fall_back_to_torch_exactly():
    reference, fast = _model_pair(ADDITIVE, seed=9, dtype=torch.float64)
    idx = torch.randint(0, 37, (2, 7))
    with torch.no_grad():
        assert torch.equal(reference.cpu()(idx).logits, fast.cpu()(idx).logits)


def test_kernels_is_checked_and_the_model_says_where_it_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="kernels"):
        LoopLMConfig(**TINY, kernels="cuda")
    import looplm.kernels.loop as loop
    monkeypatch.setattr(loop, "HAS_TRITON", False)
    with pytest.raises(ValueError, match="needs Triton"):
        LoopLMConfig(**TINY, kernels="triton")
    monkeypatch.undo()
    monkeypatch.setattr(loop, "INTERPRET", False)
    model = LoopLM(LoopLMConfig(**TINY, kernels="triton"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        model(torch.randint(0, 37, (1, 4)))


def test_returning_no_logits_needs_targets():
    model = LoopLM(LoopLMConfig(**TINY, kernels="triton")).double()
    with pytest.raises(ValueError, match="needs targets"):
        model(torch.randint(0, 37, (1, 4)), return_logits=False)


def test_import_looplm_works_without_triton():
    """A fresh interpreter where `import triton` fails: looplm and its kernels' modules import,
    the torch path runs, and kernels='triton' is refused by name."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, looplm\n"
            "from looplm.kernels import multi_exit_linear_cross_entropy\n"
            "from looplm.model import LoopLM, LoopLMConfig\n"
            "m = LoopLM(LoopLMConfig(vocab_size=11, d_model=16, n_heads=2))\n"
            "m(torch.randint(0, 11, (1, 5)))\n"
            "s, w, t = torch.randn(2, 5, 16), torch.randn(11, 16), torch.randint(0, 11, (5,))\n"
            "print(multi_exit_linear_cross_entropy(s, w, t).shape)\n"
            "try:\n    LoopLMConfig(vocab_size=11, d_model=16, n_heads=2, kernels='triton')\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([2, 5])" in done.stdout and "refused: kernels='triton' needs Triton" in done.stdout


run_tests(test_the_kernel_plan_reports_what_runs, test_returning_no_logits_needs_targets)


# %% [markdown]
# ## The benchmark: `python -m looplm.bench kernels`
#
# On a GPU the benchmark times every kernel against torch eager, `torch.compile` of the same
# function and Liger-Kernel where it is installed, all in one run, with
# `triton.testing.do_bench` (the median over repeated launches, the GPU's own clock). It first
# measures the device's two ceilings: copy bandwidth (a large device-to-device copy) and bf16
# matrix-product throughput (8192² by 8192²). Each row then reports the time, the peak memory
# the call allocates, and a roofline figure: the bytes the function must move (the fused
# minimum, the same for every contestant, so the figure compares like with like) over the time,
# as a fraction of the copy bandwidth; or, for the products, FLOP/s as a fraction of the matmul
# peak. The contestants' outputs are checked against torch eager first, and a row that disagrees
# says so instead of a time.
#
# On a CPU there is nothing to time: the interpreter's speed says nothing about a GPU's. The
# command says so and runs the interpreted correctness checks instead, the same comparisons as
# chapter 10's, as a table.

# %%
#| export bench
import inspect
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from looplm.block import apply_rope, rope_angles
from looplm.checks import require_int
from looplm.kernels.attention import flash_attention
from looplm.kernels.cross_entropy import multi_exit_cross_entropy_reference, multi_exit_linear_cross_entropy
from looplm.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference
from looplm.kernels.rope import rope
from looplm.kernels.runtime import INTERPRET, runs_in_triton
from looplm.kernels.swiglu import swiglu, swiglu_reference
from looplm.kernels.update import masked_update, masked_update_reference
from looplm.model import LoopLM, LoopLMConfig


def kernel_checks(device="cpu"):
    """[(kernel, case, largest relative error, tolerance)] of every kernel against its float64
    reference, forward and backward (the interpreter on a CPU). Needs the kernels runnable here."""
    g = torch.Generator().manual_seed(0)

    def worst(fn, reference, shapes, dtype, integer=(), grad=True):
        inputs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        upstream = None
        results = []
        for f, dt in ((fn, dtype), (reference, torch.float64)):
            args = [x.to(device, dt, copy=True).requires_grad_(grad) for x in inputs]
            outs = f(*args, *integer)
            outs = outs if isinstance(outs, tuple) else (outs,)
            if upstream is None:
                upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(device) for o in outs]
            if grad:
                sum((o.double() * u).sum() for o, u in zip(outs, upstream)).backward()
            results.append([*outs, *(a.grad for a in args if grad)])
        errors = []
        for a, b in zip(*results):
            diff, scale = (a.double() - b.double()).abs().max().item(), b.double().abs().max().item()
            errors.append(diff / scale if scale > 0 else diff)
        return max(errors)

    cos, sin = (t.to(device) for t in rope_angles(12, 11))
    targets = torch.randint(0, 53, (13,), generator=g).to(device)
    targets[::4] = -100
    active = (torch.rand(5, 3, generator=g) < 0.6).to(device)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    cases = [
        ("add_rmsnorm", "[3, 7, 24] + injection", lambda d: worst(lambda h, j, w: add_rmsnorm(h, j, w, 1e-6),
         lambda h, j, w: add_rmsnorm_reference(h, j, w, 1e-6), [(3, 7, 24), (3, 7, 24), (24,)], d)),
        ("swiglu", "[3, 5, 77]", lambda d: worst(swiglu, swiglu_reference, [(3, 5, 77), (3, 5, 77)], d)),
        ("rope", "[2, 3, 11, 12]", lambda d: worst(lambda x: rope(x, cos.to(d), sin.to(d)),
         lambda x: apply_rope(x, cos.double(), sin.double()), [(2, 3, 11, 12)], d)),
        ("flash_attention", "[2, 3, 13, 24], causal", lambda d: worst(flash_attention, sdpa, [(2, 3, 13, 24)] * 3, d)),
        ("multi_exit_linear_cross_entropy", "S 3, N 13, D 24, V 53, ignored rows",
         lambda d: worst(multi_exit_linear_cross_entropy, multi_exit_cross_entropy_reference, [(3, 13, 24), (53, 24)],
                         d, integer=(targets,))),
        ("masked_update", "[5, 3, 37], 40% exited", lambda d: worst(
            lambda h, x, u: masked_update(h, x, u, active), lambda h, x, u: masked_update_reference(h, x, u, active),
            [(5, 3, 37)] * 3, d, grad=False)),                       # decoding: no backward
    ]
    rows = []
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if torch.device(device).type == "cuda" else ())
    for name, case, run in cases:
        for dtype in dtypes:
            tolerance = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
            rows.append((name, f"{case}, {str(dtype).removeprefix('torch.')}", run(dtype), tolerance))
    return rows


def format_kernel_checks(rows):
    lines = [f"{'kernel':32s} {'case':48s} {'error':>9s} {'tolerance':>9s}"]
    for name, case, error, tolerance in rows:
        lines.append(f"{name:32s} {case:48s} {error:9.1e} {tolerance:9.1e}  {'ok' if error <= tolerance else 'FAIL'}")
    return "\n".join(lines)


# %% [markdown]
# The GPU part. `_timed` runs one contestant: a correctness check against eager, then
# `do_bench` for the time, then one more call between peak-memory resets for the memory.

# %%
#| export bench
def _gpu_ceilings(dtype):
    """(copy bandwidth in bytes/s, matmul FLOP/s) measured on this GPU."""
    from triton.testing import do_bench
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy = 2 * x.numel() / (do_bench(lambda: y.copy_(x)) * 1e-3)
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    matmul = 2 * 8192**3 / (do_bench(lambda: a @ b) * 1e-3)
    return copy, matmul


def _timed(fn, check=None):
    """(milliseconds, peak MB allocated beyond the inputs, None) or (None, None, why)."""
    from triton.testing import do_bench
    try:
        if check is not None:
            problem = check()
            if problem:
                return None, None, problem
        ms = do_bench(fn, warmup=10, rep=50)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return ms, (torch.cuda.max_memory_allocated() - base) / 2**20, None
    except Exception as e:                        # a contestant that fails says why, the rest run on
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"


def _liger(name):
    """A Liger-Kernel object by dotted path, or None when Liger is not installed."""
    try:
        module, _, attribute = name.rpartition(".")
        return getattr(__import__(module, fromlist=[attribute]), attribute)
    except (ImportError, AttributeError):
        return None


def _agree(a, b, dtype):
    """'' when a equals b within 8 roundings of dtype (relative to b's largest value), else a message."""
    a, b = (t.double() for t in (a, b))
    error = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return "" if error <= 8 * torch.finfo(dtype).eps else f"disagrees with eager: relative error {error:.1e}"


def bench_kernels(dtype=torch.bfloat16, quick=False, compile=True, seed=0):
    """Every kernel against eager, torch.compile and Liger-Kernel on this GPU. -> dict with "rows":
    [(kernel, contestant, mode, ms, peak MB, roofline fraction or None, note)], "ceilings", "settings".
    quick=True: smaller sizes (a smoke run)."""
    if not torch.cuda.is_available():
        raise ValueError("bench_kernels times kernels on a GPU, and this machine has none")
    torch.manual_seed(seed)
    dev, size = "cuda", dtype.itemsize
    copy_bw, matmul_peak = _gpu_ceilings(dtype)
    rows = []

    def add(kernel, contestants, bytes_or_flops, kind):
        """contestants: {name: (forward, forward_and_backward, output for the check)}."""
        reference = None
        for name, (forward, both, output) in contestants.items():
            if reference is None:
                reference = output()
            check = (lambda output=output: _agree(output(), reference, dtype)) if reference is not None else None
            for mode, fn in (("fwd", forward), ("fwd+bwd", both)):
                if fn is None:
                    continue
                ms, mb, note = _timed(fn, check if mode == "fwd" else None)
                work = bytes_or_flops[mode]
                peak = copy_bw if kind == "bytes" else matmul_peak
                fraction = None if ms is None else work / (ms * 1e-3) / peak
                rows.append((kernel, name, mode, ms, mb, fraction, note or ""))

    def compiled(fn):
        return torch.compile(fn) if compile else None

    def with_backward(fn, inputs, upstream):
        def run():
            outs = fn()
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.backward(outs, upstream[:len(outs)])
            for x in inputs:
                x.grad = None
        return run

    # 1. RMSNorm + injection, 16384 x 4096
    N, D = (4096, 1024) if quick else (16384, 4096)
    h, inj = (torch.randn(N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    w = torch.ones(D, device=dev, dtype=dtype, requires_grad=True)
    up = [torch.randn(N, D, device=dev, dtype=dtype) for _ in range(2)]
    eager = lambda: (lambda u: (u, F.rms_norm(u, (D,), w, 1e-6)))(h + inj)
    fused = lambda: add_rmsnorm(h, inj, w, 1e-6)
    contestants = {"torch eager (add, F.rms_norm)": eager, "triton fused": fused}
    if compile:
        contestants["torch.compile"] = torch.compile(eager)
    liger = _liger("liger_kernel.ops.rms_norm.LigerRMSNormFunction")
    if liger is not None:
        contestants["Liger (add, LigerRMSNorm)"] = lambda: (lambda u: (u, liger.apply(u, w, 1e-6)))(h + inj)
    add("RMSNorm + injection", {name: (lambda f=f: f(), with_backward(f, (h, inj, w), up), lambda f=f: f()[1])
                                for name, f in contestants.items()},
        {"fwd": 4 * N * D * size, "fwd+bwd": 8 * N * D * size}, "bytes")

    # 2. SwiGLU, 16384 x 8192 (hidden)
    N, H = (4096, 2048) if quick else (16384, 8192)
    gate, upp = (torch.randn(N, H, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    dy = [torch.randn(N, H, device=dev, dtype=dtype)]
    eager = lambda: F.silu(gate) * upp
    contestants = {"torch eager": eager, "triton fused": lambda: swiglu(gate, upp)}
    if compile:
        contestants["torch.compile"] = torch.compile(eager)
    liger = _liger("liger_kernel.ops.swiglu.LigerSiLUMulFunction")
    if liger is not None:
        contestants["Liger"] = lambda: liger.apply(gate, upp)
    add("SwiGLU", {name: (f, with_backward(f, (gate, upp), dy), f) for name, f in contestants.items()},
        {"fwd": 3 * N * H * size, "fwd+bwd": 8 * N * H * size}, "bytes")

    # 3. rotary embedding of q, [8, 32, 2048, 128]
    B, Hh, T, hs = (2, 8, 1024, 128) if quick else (8, 32, 2048, 128)
    q = torch.randn(B, Hh, T, hs, device=dev, dtype=dtype, requires_grad=True)
    cos, sin = (t.to(dev, dtype) for t in rope_angles(hs, T))
    dq = [torch.randn_like(q)]
    eager = lambda: apply_rope(q, cos, sin)
    contestants = {"torch eager": eager, "triton": lambda: rope(q, cos, sin)}
    if compile:
        contestants["torch.compile"] = torch.compile(eager)
    add("rotary embedding", {name: (f, with_backward(f, (q,), dq), f) for name, f in contestants.items()},
        {"fwd": 2 * q.numel() * size, "fwd+bwd": 4 * q.numel() * size}, "bytes")

    # 4. causal attention, [4, 16, 2048, 64]
    B, Hh, T, hs = (2, 8, 1024, 64) if quick else (4, 16, 2048, 64)
    qkv = [torch.randn(B, Hh, T, hs, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]
    do = [torch.randn(B, Hh, T, hs, device=dev, dtype=dtype)]
    sdpa = lambda: F.scaled_dot_product_attention(*qkv, is_causal=True)
    flash = lambda: flash_attention(*qkv)
    flops = 4 * B * Hh * T * T * hs / 2                                   # causal: half the square
    add("causal attention", {name: (f, with_backward(f, qkv, do), f) for name, f in
                             {"torch SDPA": sdpa, "triton flash": flash}.items()},
        {"fwd": flops, "fwd+bwd": 3.5 * flops}, "flops")

    # 5. four exits' linear cross-entropy, N 8192, D 2048, V 50304
    S, N, D, V = (4, 2048, 1024, 50304) if quick else (4, 8192, 2048, 50304)
    states = torch.randn(S, N, D, device=dev, dtype=dtype, requires_grad=True)
    head = (torch.randn(V, D, device=dev, dtype=dtype) / D**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), device=dev)

    def per_exit():
        return torch.stack([F.cross_entropy(F.linear(states[s], head).float(), targets, reduction="none")
                            for s in range(S)]).mean()

    ours = lambda: multi_exit_linear_cross_entropy(states, head, targets).mean()
    contestants = {"torch eager, per exit": per_exit, "triton multi-exit": ours}
    if compile:
        contestants["torch.compile, per exit"] = torch.compile(per_exit)
    liger = _liger("liger_kernel.transformers.fused_linear_cross_entropy.LigerFusedLinearCrossEntropyLoss")
    if liger is not None:
        loss = liger()
        contestants["Liger FLCE, exits concatenated"] = lambda: loss(head, states.view(S * N, D), targets.repeat(S))
    one = torch.ones((), device=dev)
    add("4-exit linear cross-entropy", {name: (f, with_backward(f, (states, head), [one]), f)
                                        for name, f in contestants.items()},
        {"fwd": 2 * S * N * V * D, "fwd+bwd": 6 * S * N * V * D}, "flops")

    # 6. a full training step of a looped model: kernels="triton" against torch.compile
    rows.extend(_bench_training_step(dtype, quick, compile, seed))
    return {"rows": rows, "ceilings": (copy_bw, matmul_peak),
            "settings": dict(dtype=str(dtype), device=torch.cuda.get_device_name(), quick=quick,
                             torch=torch.__version__, triton=__import__("triton").__version__,
                             liger=_liger("liger_kernel.__version__") or "not installed")}


def _bench_training_step(dtype, quick, compile, seed):
    from triton.testing import do_bench
    options = dict(vocab_size=50304, d_model=512 if quick else 1024, n_heads=8 if quick else 16, n_loops=4,
                   injection="add", init_state="zeros", max_seq_len=1024)
    B, T = (4, 512) if quick else (8, 1024)
    idx = torch.randint(0, 50304, (B, T + 1), device="cuda")
    rows = []
    torch.manual_seed(seed)
    reference = LoopLM(LoopLMConfig(**options)).to("cuda", dtype)
    contestants = {"torch eager": (reference, {}), "triton kernels, no logits": (None, dict(return_logits=False))}
    if compile:
        contestants["torch.compile"] = (torch.compile(reference), {})
    for name, (model, kwargs) in contestants.items():
        if model is None:
            model = LoopLM(LoopLMConfig(**options, kernels="triton")).to("cuda", dtype)
            model.load_state_dict(reference.state_dict())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, kwargs=kwargs, optimizer=optimizer):
            loss = model(idx[:, :-1], idx[:, 1:], **kwargs).step_losses.mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        try:
            ms = do_bench(step, warmup=3, rep=30)
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            rows.append(("training step", name, f"batch {B} x {T}", ms, torch.cuda.max_memory_allocated() / 2**20,
                         None, ""))
        except Exception as e:
            rows.append(("training step", name, f"batch {B} x {T}", None, None, None,
                         f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"))
    return rows


def format_kernel_table(result):
    copy_bw, matmul = result["ceilings"]
    s = result["settings"]
    lines = [f"kernels on {s['device']}, {s['dtype']}; torch {s['torch']}, triton {s['triton']}, Liger {s['liger']}",
             f"measured ceilings: copy {copy_bw / 1e12:.2f} TB/s, matmul {matmul / 1e12:.0f} TFLOP/s",
             f"{'kernel':28s} {'contestant':32s} {'mode':14s} {'ms':>8s} {'vs first':>8s} {'peak MB':>8s} "
             f"{'roofline':>8s}"]
    for kernel, name, mode, ms, mb, fraction, note in result["rows"]:
        first = next((r[3] for r in result["rows"] if r[0] == kernel and r[2] == mode and r[3] is not None), None)
        if ms is None:
            lines.append(f"{kernel:28s} {name:32s} {mode:14s} {note}")
            continue
        ratio = f"{first / ms:7.2f}x" if first else ""
        roof = "" if fraction is None else f"{fraction:8.0%}"
        lines.append(f"{kernel:28s} {name:32s} {mode:14s} {ms:8.3f} {ratio:>8s} {mb:8.0f} {roof:>8s}")
    lines.append("vs first: speed relative to the first contestant of the group (above 1: faster); roofline: "
                 "bytes (or FLOP) the function needs, over the time, as a share of the measured ceiling")
    return "\n".join(lines)


def plot_kernels(result, path):
    from matplotlib.figure import Figure
    groups = {}
    for kernel, name, mode, ms, *_ in result["rows"]:
        if ms is not None and mode != "fwd":
            groups.setdefault(kernel, []).append((name, ms))
    fig = Figure(figsize=(8, 0.5 + 0.35 * sum(len(v) for v in groups.values())))
    ax = fig.add_subplot()
    labels, values = [], []
    for kernel, entries in groups.items():
        base = entries[0][1]
        for name, ms in entries:
            labels.append(f"{kernel}: {name}")
            values.append(base / ms)
    ax.barh(labels[::-1], values[::-1], color="C0")
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set(xlabel="speed relative to the first contestant (forward + backward)",
           title=f"python -m looplm.bench kernels ({result['settings']['device']})")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

# %% [markdown]
# The decoding question of section 10.1: under per-token exit, should a decoder drop the exited
# rows from its batch (chapter 7's decoder indexes the rows that still run: `h[keep]`, and the
# same for the input, the rope rows and the cache rows), or run every row and mask the exited ones
# (the masked update)? Dropping saves the arithmetic of the exited rows; masking saves the
# gathers, the host synchronisation that `keep.any()` forces, and keeps the shapes fixed (which
# CUDA graphs need). `bench_exit_update` times one decoding position's loop both ways, on the
# states alone (no KV cache, so the cache gathers that indexing also pays are left out), with each
# token's exit step drawn uniformly from $1 \ldots S$.

# %%
#| export bench
def bench_exit_update(model, batch=64, repeats=7, seeds=(0, 1, 2)):
    """One decoding position's loop under per-token exit, two ways, for each seed's draw of the exit
    steps. -> dict with "rows": [(strategy, [seconds per seed], [relative to indexing per seed])] and
    "settings"; for each seed both strategies end with every row at its own exit state (checked)."""
    require_int("batch", batch, 1)
    require_int("repeats", repeats, 1)
    c = model.config
    weight = model.lm_head.weight
    device, dtype, S = weight.device, weight.dtype, c.n_loops
    cos, sin = model.rope(1)
    kernel_step = "active" in inspect.signature(model.step).parameters
    names = ("drop exited rows (indexing)", "run all rows, masked update")
    seconds = {name: [] for name in names}
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        exit_at = torch.randint(1, S + 1, (batch,), generator=g).to(device)    # each token's exit step
        x0 = torch.randn(batch, 1, c.d_model, generator=g).to(device, dtype)

        @torch.no_grad()
        def by_index():
            out = torch.empty_like(x0)
            h, inputs, live = model.init_state(x0), x0, torch.arange(batch, device=device)
            for s in range(1, S + 1):
                h = model.step(h, inputs, cos, sin)
                leaving = exit_at[live] == s
                out[live[leaving]] = h[leaving]
                keep = ~leaving
                if not keep.any():                                             # a host synchronisation
                    break
                live, h, inputs = live[keep], h[keep], inputs[keep]
            return out

        @torch.no_grad()
        def by_mask():
            h = model.init_state(x0)
            for s in range(1, S + 1):
                active = (exit_at >= s)[:, None]                               # (B, 1): still running
                if kernel_step:
                    h = model.step(h, x0, cos, sin, active=active)
                else:
                    h = torch.where(active[..., None], model.step(h, x0, cos, sin), h)
            return h

        a, b = by_index(), by_mask()
        if ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() > 1e-4:
            raise RuntimeError("the two exit strategies disagree; the benchmark would compare different work")
        for name, t in _median_seconds(dict(zip(names, (by_index, by_mask))), repeats, device).items():
            seconds[name].append(t)
    first = seconds[names[0]]
    return {"rows": [(name, t, [x / y for x, y in zip(t, first)]) for name, t in seconds.items()],
            "settings": dict(batch=batch, n_loops=S, d_model=c.d_model, device=str(device), dtype=str(dtype),
                             kernels=c.kernels, threads=torch.get_num_threads(), seeds=tuple(seeds))}


def format_exit_update_table(result):
    s = result["settings"]
    lines = [f"per-token exit, one decoding position: batch {s['batch']}, {s['n_loops']} steps, d_model {s['d_model']}, "
             f"kernels={s['kernels']!r}, {s['device']} ({s['threads']} threads), {s['dtype']}; exit steps drawn "
             f"uniformly, seeds {', '.join(map(str, s['seeds']))}",
             f"{'strategy':32s} {'ms per seed':>26s}   {'relative per seed':>20s}"]
    for name, seconds, relative in result["rows"]:
        lines.append(f"{name:32s} {' '.join(f'{t * 1e3:8.3f}' for t in seconds):>26s}   "
                     f"{' '.join(f'{r:6.2f}' for r in relative):>20s}")
    return "\n".join(lines)


def _kernels_arguments(parser):
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (timings) or cpu (interpreted checks; default: cuda when there is one)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--repeats", type=int, default=7, help="turns of the decoding benchmark (default 7)")
    parser.add_argument("--out", default="build/bench/kernels.png", help="bar plot (default build/bench/kernels.png)")


def _kernels_command(args):
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine; use --device cpu")
    if args.device == "cpu" and not INTERPRET and os.environ.get("TRITON_INTERPRET") is None:
        # the kernels were defined when looplm was imported, without the interpreter: run the
        # command again in a process that has it from the start
        flags = ["--device", "cpu", "--repeats", str(args.repeats), "--out", args.out]
        flags += ["--quick"] * args.quick + ["--no-compile"] * args.no_compile
        again = subprocess.run([sys.executable, "-m", "looplm.bench", "kernels", *flags],
                               env={**os.environ, "TRITON_INTERPRET": "1"})
        return again.returncode
    failed = False
    if args.device == "cpu":
        print("Kernel timings need a GPU: on a CPU the kernels run in Triton's interpreter, whose speed says\n"
              "nothing about a GPU's. Running the interpreted correctness checks instead.\n")
    if not runs_in_triton(torch.zeros(1, device=args.device)):
        print("The kernels cannot run here (Triton missing, or TRITON_INTERPRET=1 was not set before they were "
              "imported): no checks.")
        failed = True
    else:
        rows = kernel_checks(args.device)
        print(format_kernel_checks(rows))
        failed = any(error > tolerance for *_, error, tolerance in rows)
    if args.device == "cuda":
        result = bench_kernels(quick=args.quick, compile=not args.no_compile)
        print("\n" + format_kernel_table(result))
        print(f"\nsaved {plot_kernels(result, args.out)}")
    options = dict(vocab_size=256, d_model=256, n_heads=4, n_loops=8, injection="add", init_state="zeros")
    kinds = ("torch",) if args.device == "cpu" else ("torch", "triton")
    for kernels in kinds:                                     # on a CPU the interpreter would time numpy
        torch.manual_seed(0)
        model = LoopLM(LoopLMConfig(**options, kernels=kernels)).to(args.device).eval()
        print("\n" + format_exit_update_table(bench_exit_update(model, repeats=args.repeats)))
    return 1 if failed else 0


BENCHMARKS["kernels"] = ("Triton kernels: timings against eager, compile and Liger on a GPU; checks on a CPU",
                         _kernels_arguments, _kernels_command)

# %% [markdown]
# On this machine (no GPU), the command runs the checks and the decoding comparison:

# %% tags=["timing"]
bench = subprocess.run([sys.executable, "-m", "looplm.bench", "kernels", "--device", "cpu", "--repeats", "5",
                        "--out", str(Path(tempfile.mkdtemp()) / "kernels.png")], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"})
print(bench.stdout, bench.stderr[-2000:])

# %% tags=["remove-cell"]
#| test
import contextlib
import io

from looplm.bench import bench_exit_update, bench_kernels, kernel_checks, main


@needs_kernels
def test_the_kernel_checks_cover_every_kernel_and_pass():
    rows = kernel_checks(DEVICE)
    assert {r[0] for r in rows} == {"add_rmsnorm", "swiglu", "rope", "flash_attention",
                                    "multi_exit_linear_cross_entropy", "masked_update"}
    assert all(error <= tol for *_, error, tol in rows), [r for r in rows if r[2] > r[3]]


@needs_kernels
def test_both_exit_strategies_reach_the_same_states_on_either_path():
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        model = LoopLM(LoopLMConfig(**TINY, injection="add", init_state="zeros", kernels=kernels)).to(DEVICE).eval()
        result = bench_exit_update(model, batch=5, repeats=1, seeds=(0, 1))
        assert [r[0] for r in result["rows"]] == ["drop exited rows (indexing)", "run all rows, masked update"]
        assert result["rows"][0][2] == [1.0, 1.0] and len(result["rows"][1][1]) == 2


def test_the_command_on_a_cpu_checks_instead_of_timing():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the command times kernels instead")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["kernels", "--device", "cpu", "--repeats", "1"])
    text = out.getvalue()
    assert "Kernel timings need a GPU" in text
    if runs_in_triton(torch.zeros(1)):
        assert status == 0 and text.count(" ok") == 12 and "FAIL" not in text
    assert "drop exited rows (indexing)" in text


def test_the_kernel_benchmark_refuses_bad_flags_and_a_missing_gpu():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["kernels", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in err.getvalue()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="GPU"):
            bench_kernels()
        with contextlib.redirect_stderr(err):
            assert main(["kernels", "--device", "cuda"]) == 2
        assert "CUDA is not available" in err.getvalue()


run_tests(test_the_kernel_benchmark_refuses_bad_flags_and_a_missing_gpu)
