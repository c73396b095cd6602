# Generated from book/10_triton_kernels.py, book/10a_appendix_kernels.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['multi_exit_cross_entropy_reference', 'multi_exit_linear_cross_entropy_torch', 'multi_exit_linear_cross_entropy']
# fmt: on

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from looplm.kernels.runtime import INTERPRET, next_power_of_2, runs_in_triton, tl, triton

# --- book/10_triton_kernels.py:923 (cell 41) ---
# Exits handled by one tile. Larger S is split into groups of this many exits
# (the head is then read once per group rather than once per exit).
_MAX_EXITS_PER_TILE = 16


def multi_exit_cross_entropy_reference(states, weight, targets, ignore_index=-100):
    """The plain computation: all S x N x V logits, then F.cross_entropy per token. -> [S, N]"""
    S, N, _ = states.shape
    logits = (states @ weight.T).to(torch.promote_types(states.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(S * N, -1), targets.repeat(S), ignore_index=ignore_index,
                           reduction="none").view(S, N)

# --- book/10_triton_kernels.py:948 (cell 43) ---
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

# --- book/10a_appendix_kernels.py:480 (cell 7) ---
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

# --- book/10a_appendix_kernels.py:564 (cell 9) ---
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

# --- book/10a_appendix_kernels.py:689 (cell 11) ---
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

# --- book/10a_appendix_kernels.py:837 (cell 13) ---
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
