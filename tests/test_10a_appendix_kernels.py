# Generated from book/10a_appendix_kernels.py: edit the chapter, then run `make export`.

import contextlib
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F

from looplm.bench import (  # noqa: F401
    kernel_checks,
    format_kernel_checks,
    bench_kernels,
    format_kernel_table,
    plot_kernels,
    bench_exit_update,
    format_exit_update_table,
)
from looplm.bench import main
from looplm.block import apply_rope, rope_angles
from looplm.kernels import attention, cross_entropy as ce
from looplm.kernels.attention import (  # noqa: F401
    flash_attention,
)
from looplm.kernels.cross_entropy import (  # noqa: F401
    multi_exit_linear_cross_entropy_torch,
    multi_exit_linear_cross_entropy,
)
from looplm.kernels.cross_entropy import multi_exit_cross_entropy_reference
from looplm.kernels.loop import KernelLoopLM, kernel_plan, use_kernels
from looplm.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference
from looplm.kernels.rope import RopeFunction, rope
from looplm.kernels.runtime import INTERPRET, runs_in_triton
from looplm.kernels.swiglu import swiglu, swiglu_reference
from looplm.kernels.update import masked_update, masked_update_reference
from looplm.model import LoopLM, LoopLMConfig

# --- book/10a_appendix_kernels.py:971 (cell 15) ---
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

# --- book/10a_appendix_kernels.py:1065 (cell 16) ---
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

# --- book/10a_appendix_kernels.py:1086 (cell 17) ---
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

# --- book/10a_appendix_kernels.py:1126 (cell 18) ---
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

# --- book/10a_appendix_kernels.py:1197 (cell 19) ---
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

# --- book/10a_appendix_kernels.py:1324 (cell 20) ---
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

# --- book/10a_appendix_kernels.py:1350 (cell 21) ---
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

# --- book/10a_appendix_kernels.py:2035 (cell 30) ---
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
