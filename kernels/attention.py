# Generated from book/10_triton_kernels.py, book/10a_appendix_kernels.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['MAX_HEAD_DIM', 'flash_attention']
# fmt: on

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from looplm.kernels.runtime import INTERPRET, next_power_of_2, runs_in_triton, tl, triton

# --- book/10_triton_kernels.py:729 (cell 35) ---
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

# --- book/10a_appendix_kernels.py:63 (cell 3) ---
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

# --- book/10a_appendix_kernels.py:278 (cell 5) ---
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
