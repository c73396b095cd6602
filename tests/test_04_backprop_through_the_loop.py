# Generated from book/04_backprop_through_the_loop.py: edit the chapter, then run `make export`.

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplm.backprop import (  # noqa: F401
    STEP_WEIGHTS,
    step_weights,
    weighted_step_loss,
    saved_tensor_bytes,
    loop_forward,
    scale_core_grads,
    sample_depth,
    hidden_norm_penalty,
    step_consistency,
)
from looplm.backprop import make_loop_loss
from looplm.block import RMSNorm
from looplm.data import IGNORE_INDEX
from looplm.experiments import (  # noqa: F401
    CH04_SPLITS,
    FIXED_VS_RANDOM_DEPTH,
)
from looplm.model import LoopLM, LoopLMConfig, token_losses
from looplm.results import check_prefix

# --- book/04_backprop_through_the_loop.py:247 (cell 20) ---
def test_weighted_step_loss_matches_the_formula():
    torch.manual_seed(0)
    S, B, T = 3, 2, 5
    targets = torch.randint(0, 7, (B, T))
    targets[0, :2] = IGNORE_INDEX
    step_losses = torch.rand(S, B, T) * (targets != IGNORE_INDEX)
    cells = [(b, i) for b in range(B) for i in range(T) if targets[b, i] != IGNORE_INDEX]
    means = [sum(step_losses[t, b, i].item() for b, i in cells) / len(cells) for t in range(S)]
    for weights, raw in [("last", [0, 0, 1]), ("uniform", [1, 1, 1]), ("linear", [1, 2, 3]),
                         ([2.0, 0.0, 6.0], [2, 0, 6])]:
        expected = sum(r * m for r, m in zip(raw, means)) / sum(raw)
        got = weighted_step_loss(step_losses, targets, weights).item()
        assert math.isclose(got, expected, rel_tol=1e-6), (weights, got, expected)
    assert step_weights("linear", 4).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])

# --- book/04_backprop_through_the_loop.py:322 (cell 25) ---
class ExactRMSNorm(nn.Module):
    """RMSNorm computed in the input's dtype (the package's RMSNorm works in float32)."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def tiny_float64_model(seed=0, **overrides):
    """A tiny float64 LoopLM (d 8, 2 heads, 3 loops) whose norms keep float64."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=11, d_model=8, n_heads=2, n_loops=3, max_seq_len=4, init_std=0.3)
    model = LoopLM(LoopLMConfig(**{**fields, **overrides})).double()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RMSNorm):
                setattr(module, name, ExactRMSNorm(child))
    return model


def float64_loss(logits, targets):
    """Mean cross-entropy of the last step's logits [S, B, T, V], computed in logits' dtype."""
    return F.cross_entropy(logits[-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


tiny = tiny_float64_model()

# --- book/04_backprop_through_the_loop.py:371 (cell 27) ---
def core_loss_function(model, idx, targets):
    """(core weights...) -> loss: the model's last-step loss as a function of its core's weights."""
    names = [name for name, _ in model.named_parameters() if name.startswith("core.")]

    def loss(*core_weights):
        out = torch.func.functional_call(model, dict(zip(names, core_weights)), (idx,))
        return float64_loss(out.logits, targets)

    weights = tuple(p.detach().clone().requires_grad_() for name, p in model.named_parameters()
                    if name.startswith("core."))
    return loss, weights


def test_gradcheck_core_weights():
    model = tiny_float64_model()
    idx = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(2))
    loss, weights = core_loss_function(model, idx, targets)
    # every core weight, along random directions (fast mode)
    assert torch.autograd.gradcheck(loss, weights, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    # one weight matrix, coordinate by coordinate: the attention's output projection W_o
    names = [name for name, _ in model.named_parameters() if name.startswith("core.")]
    k = names.index("core.0.attn.proj.weight")
    only_w_o = lambda w_o: loss(*weights[:k], w_o, *weights[k + 1:])   # noqa: E731
    assert torch.autograd.gradcheck(only_w_o, (weights[k],), eps=1e-6, atol=1e-6, rtol=1e-4)

# --- book/04_backprop_through_the_loop.py:462 (cell 35) ---
def untied_step_grads(model, idx, targets, n_loops):
    """Per-step gradients of the core's weights, each step with its own copy (by hand)."""
    cos, sin = model.rope(idx.shape[1])
    params = dict(model.core.named_parameters())
    copies = [{n: p.detach().clone().requires_grad_() for n, p in params.items()} for _ in range(n_loops)]
    h = model.init_state(model.encode(idx, cos, sin))
    for t in range(n_loops):
        for i, block in enumerate(model.core):
            mine = {n.split(".", 1)[1]: p for n, p in copies[t].items() if n.startswith(f"{i}.")}
            h = torch.func.functional_call(block, mine, (h, cos, sin))
    loss = float64_loss(model.readout(h, cos, sin)[0][None], targets)
    flat = [p for copy in copies for p in copy.values()]
    grads = torch.autograd.grad(loss, flat)
    return [grads[t * len(params):(t + 1) * len(params)] for t in range(n_loops)], list(params)


def test_tied_gradient_is_sum_of_per_step_gradients():
    model = tiny_float64_model(seed=3, n_core=2, n_loops=4)
    idx = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(4))
    targets = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(5))
    per_step, names = untied_step_grads(model, idx, targets, 4)
    float64_loss(model(idx).logits, targets).backward()
    for k, name in enumerate(names):
        tied = dict(model.core.named_parameters())[name].grad
        torch.testing.assert_close(sum(step[k] for step in per_step), tied, rtol=1e-10, atol=1e-12)
        assert all(step[k].abs().sum() > 0 for step in per_step)   # every step contributes

# --- book/04_backprop_through_the_loop.py:757 (cell 60) ---
def _full_model(seed=0):
    torch.manual_seed(seed)
    return LoopLM(LoopLMConfig(vocab_size=13, d_model=16, n_heads=2, n_prelude=1, n_core=2,
                               n_coda=1, n_loops=3, tie_embeddings=False, max_seq_len=8))


def _batch(seed=0, B=3, T=6, V=13):
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    targets[:, :2] = IGNORE_INDEX
    return idx, targets


def test_loop_forward_equals_model_forward():
    model = _full_model()
    idx, targets = _batch()
    for n_loops in (1, 3, 5):
        ref = model(idx, targets=targets, n_loops=n_loops, return_hidden=True)
        for knobs in ({}, {"checkpoint": True}, {"grad_steps": 1}, {"grad_steps": n_loops, "checkpoint": True}):
            out = loop_forward(model, idx, targets=targets, n_loops=n_loops, return_hidden=True, **knobs)
            for field in ("logits", "step_losses", "loss", "hidden"):
                assert torch.equal(getattr(out, field), getattr(ref, field)), (n_loops, knobs, field)
        last = loop_forward(model, idx, targets=targets, n_loops=n_loops, readout="last")
        assert torch.equal(last.logits[0], ref.logits[-1]) and torch.equal(last.loss, ref.loss)


def test_checkpointing_gives_the_same_gradients():
    model = _full_model(1)
    idx, targets = _batch(1)

    def grads(run):
        model.zero_grad(set_to_none=True)
        out = run()
        (out.step_losses.sum() / (targets != IGNORE_INDEX).sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(lambda: model(idx, targets=targets, n_loops=4))
    for ck in (False, True):
        mine = grads(lambda: loop_forward(model, idx, targets, n_loops=4, checkpoint=ck))
        for a, b in zip(plain, mine):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

# --- book/04_backprop_through_the_loop.py:839 (cell 65) ---
def test_truncated_backprop_drops_the_early_steps():
    model = _full_model(2)
    idx, targets = _batch(2)
    S, k = 5, 2

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    def by_hand():
        cos, sin = model.rope(idx.shape[1])
        x0 = model.encode(idx, cos, sin)
        h = model.init_state(x0)
        losses = []
        for t in range(S):
            h = model.step(h.detach() if t == S - k else h, x0, cos, sin)
            if t >= S - k:                               # only the last k readouts carry gradient
                losses.append(token_losses(model.readout(h, cos, sin)[0][None], targets)[0].sum())
        return sum(losses)

    def truncated():
        return loop_forward(model, idx, targets, n_loops=S, grad_steps=k).step_losses.sum()

    for a, b in zip(grads(truncated), grads(by_hand)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    full = grads(lambda: loop_forward(model, idx, targets, n_loops=S).step_losses.sum())
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(grads(truncated), full))

# --- book/04_backprop_through_the_loop.py:920 (cell 70) ---
def test_checkpointing_saves_less_for_backward():
    model = _full_model(5)
    idx, targets = _batch(5)
    params = list(model.parameters())

    def saved(checkpoint):
        return saved_tensor_bytes(lambda: loop_forward(model, idx, targets, n_loops=6, checkpoint=checkpoint).loss,
                                  params)[0]

    plain, checkpointed = saved(False), saved(True)
    assert 0 < checkpointed < plain / 2, (plain, checkpointed)

# --- book/04_backprop_through_the_loop.py:1185 (cell 94) ---
def test_sample_depth_is_reproducible_and_has_the_stated_mean():
    first = [sample_depth(4, 0.5, torch.Generator().manual_seed(7)) for _ in range(3)]
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert [sample_depth(6.5, 0.5, g1) for _ in range(50)] == [sample_depth(6.5, 0.5, g2) for _ in range(50)]
    assert len(set(first)) == 1
    g = torch.Generator().manual_seed(0)
    for mean_steps in (2, 8):
        draws = torch.tensor([sample_depth(mean_steps, 0.5, g) for _ in range(8000)], dtype=torch.float64)
        assert draws.min() >= 1
        # Var r = r̄ + r̄^2 (e^{σ^2} - 1); five standard errors of the mean of 8000 draws
        tolerance = 5 * math.sqrt((mean_steps + mean_steps**2 * (math.exp(0.25) - 1)) / 8000)
        assert abs(draws.mean().item() - (mean_steps + 1)) < tolerance
    assert {sample_depth(3, 0.0, g) for _ in range(200)} >= {1, 3, 5}   # sigma 0: Poisson(3) + 1

# --- book/04_backprop_through_the_loop.py:1433 (cell 115) ---
def test_stored_depth_experiment_matches_a_live_prefix():
    difference, _ = check_prefix("fixed-vs-random-depth")
    assert difference <= 1e-3

# --- book/04_backprop_through_the_loop.py:1519 (cell 122) ---
def test_bad_arguments_get_clear_errors():
    model = _full_model()
    idx, targets = _batch()
    losses = model(idx, targets=targets).step_losses                     # (3, B, T)
    with pytest.raises(ValueError, match=r"one weight per step: 3 steps ran, got weights of shape \[2\]"):
        weighted_step_loss(losses, targets, [1.0, 2.0])
    with pytest.raises(ValueError, match="finite and non-negative"):
        weighted_step_loss(losses, targets, [1.0, -2.0, 1.0])
    with pytest.raises(ValueError, match="must not all be zero"):
        weighted_step_loss(losses, targets, [0, 0, 0])
    with pytest.raises(ValueError, match="step weights must be one of 'last', 'uniform', 'linear'"):
        step_weights("exponential", 3)
    with pytest.raises(ValueError, match="no position to learn"):
        weighted_step_loss(losses, torch.full_like(targets, IGNORE_INDEX))
    with pytest.raises(ValueError, match="grad_steps must be an int >= 1, got 0"):
        loop_forward(model, idx, grad_steps=0)
    with pytest.raises(ValueError, match="grad_steps must be <= n_loops: 3 steps run"):
        loop_forward(model, idx, grad_steps=4)
    with pytest.raises(ValueError, match="n_loops must be an int >= 1, got 0"):
        loop_forward(model, idx, n_loops=0)
    with pytest.raises(ValueError, match="readout must be 'all' or 'last'"):
        loop_forward(model, idx, readout="first")
    with pytest.raises(ValueError, match="checkpoint must be True or False"):
        loop_forward(model, idx, checkpoint="yes")
    with pytest.raises(ValueError, match="mean_steps must be a finite number > 0"):
        sample_depth(0)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        sample_depth(4, sigma=-1)
    with pytest.raises(ValueError, match="explicit step weights need a fixed depth"):
        make_loop_loss(step_weights=[1, 1], sample_depth=3)
    with pytest.raises(ValueError, match="norm_penalty must be a finite number >= 0"):
        make_loop_loss(norm_penalty=float("nan"))
    with pytest.raises(ValueError, match="factor must be a finite number"):
        scale_core_grads(model, float("inf"))
