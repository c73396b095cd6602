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
# # Chapter 4: Backpropagation through the loop
#
# A looped model with $S$ steps is a network $S$ blocks deep whose blocks share one set of
# weights. Training it means backpropagating through all $S$ applications of the core, and
# that has consequences a standard transformer never meets:
#
# - the gradient of a shared weight is a *sum* with one term per step, so it changes with
#   the step count;
# - the activations autograd keeps for the backward pass grow with every step, so memory
#   grows with depth even though the parameter count does not;
# - the step count is a choice made at run time, so training can vary it.

# %% [markdown]
# Published looped models answer these in different ways. Huginn (arXiv 2502.05171) draws a
# fresh step count for every batch and backpropagates through the last $k = 8$ steps only.
# Yang et al. (arXiv 2311.12424) average the loss over a window of the last steps and run the
# earlier ones without gradients. TRM (arXiv 2510.04871) supervises the model again and again
# on a detached state. Ouro (arXiv 2510.25741) puts a loss on every step. This chapter builds
# the machinery behind all of them and measures what each piece costs.

# %% [markdown]
# The plan:
#
# 1. a loss at every step, and a weighted sum of them;
# 2. the gradient of a shared weight, checked with `gradcheck` and split into its per-step terms;
# 3. activation memory, measured, as a function of the step count;
# 4. `loop_forward`, a loop runner for training with truncated backpropagation and
#    activation checkpointing;
# 5. how the gradient's size depends on the step count, and what to do about it;
# 6. randomized depth, Huginn's way;
# 7. a loss function for chapter 3's `Trainer` with all of the above as options, plus two
#    optional regularizers;
# 8. an experiment: fixed against randomized depth;
# 9. checkpoints on disk and a command line for training;
# 10. a benchmark against a minimal looped model in plain PyTorch;
# 11. clear errors for bad input.
#
# The loss machinery goes to `looplm/backprop.py`, the checkpoints and the command line extend
# chapter 3's `looplm/train.py`, and the benchmark goes to `looplm/bench.py`.

# %%
import contextlib
import io
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import Image, display

import looplm
from looplm.block import RMSNorm
from looplm.data import IGNORE_INDEX, TASK_VOCAB, encode_examples, make_splits, make_task
from looplm.model import LoopLM, LoopLMConfig, token_losses
from looplm.testing import run_tests
from looplm.train import TrainConfig, Trainer, default_loss, task_accuracy, task_batches

_ = torch.manual_seed(0)
print("torch", torch.__version__, "| looplm", looplm.__version__)

# %% [markdown]
# The next cell names this chapter's module, `looplm/backprop.py`, and the cell after it holds
# the module's imports.

# %%
#| default_exp backprop

# %%
#| export
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _activation_checkpoint

from looplm.data import IGNORE_INDEX
from looplm.model import (LoopOutput, _check_targets, _check_token_ids, _require_bool, _require_int,
                          token_losses)

# %% [markdown]
# ## 4.1 A loss at every step
#
# Chapter 2's `LoopLM` reads out a prediction after every step. Given targets it also returns
# the per-token cross-entropy of every readout, `out.step_losses` of shape $[S, B, T]$, and
# `out.loss`, the mean over the learned tokens of the **last** step's losses.

# %% [markdown]
# The examples in this chapter come from chapter 0's stack task: a prompt lists pushes
# (digits) and pops (`-`), and the answer is the final stack, bottom to top. Only the answer
# tokens and the end token are learned; every other target is `IGNORE_INDEX`. We train and
# test on 1 to 4 operations.

# %% tags=["nbval-check-output"]
stack_task = make_task("stack")
splits = make_splits(stack_task, n_train=5000, n_test=500, max_difficulty=4, ood_max_difficulty=5, seed=0)
train_data, test_data = encode_examples(splits.train), encode_examples(splits.test)
print("train", tuple(train_data.idx.shape), "test", tuple(test_data.idx.shape))
print("examples:", *splits.train[:3], sep="\n  ")

# %% [markdown]
# A small looped model and one batch:

# %% tags=["nbval-check-output"]
_ = torch.manual_seed(0)
config = LoopLMConfig(TASK_VOCAB.vocab_size, d_model=64, n_heads=4, n_loops=4, max_seq_len=16)
model = LoopLM(config)
idx, targets = train_data.idx[:16], train_data.targets[:16]          # (B, T) each
out = model(idx, targets=targets)
print("step_losses", tuple(out.step_losses.shape))
learned = targets != IGNORE_INDEX
print("mean loss per step:", [round(x, 4) for x in (out.step_losses.sum((1, 2)) / learned.sum()).tolist()])
print("out.loss (last step):", round(out.loss.item(), 4))

# %% [markdown]
# Write $L_t$ for step $t$'s mean loss over the learned tokens $M$ (the positions whose target
# is not `IGNORE_INDEX`):
#
# $$
# L_t = \frac{1}{|M|} \sum_{(b, i) \in M} \ell_{t, b, i}, \qquad
# \mathcal{L} = \sum_{t=1}^{S} \bar w_t L_t, \qquad \bar w_t = \frac{w_t}{\sum_{s=1}^{S} w_s}.
# $$
#
# The weights are **normalised**: $\mathcal{L}$ is a weighted *average* of the per-step
# losses, so its size does not depend on how many steps ran, and the "last" scheme gives
# exactly `out.loss`.

# %% [markdown]
# Three schemes cover what the published models do:
#
# - `"last"`: $w = (0, \dots, 0, 1)$. Only the final readout is trained (Huginn, Fan et al.).
#   The earlier readouts are free to be anything.
# - `"uniform"`: $w_t = 1$. Every step must predict the answer: deep supervision. It is what
#   makes an early exit possible, and Ouro's exit-weighted loss of chapter 5 starts here.
# - `"linear"`: $w_t = t$. Later steps count more, earlier ones are still asked to be useful.
#
# Any other non-negative weights, one per step, can be passed as a list or tensor.

# %%
#| export
STEP_WEIGHTS = ("last", "uniform", "linear")


def step_weights(scheme, n_steps):
    """The weights of a named scheme for n_steps steps, normalised to sum to 1 -> float32 [S].

    "last": (0, ..., 0, 1); "uniform": all equal; "linear": proportional to t = 1..S.
    """
    _require_int("n_steps", n_steps, 1)
    if scheme == "last":
        weights = torch.zeros(n_steps)
        weights[-1] = 1.0
    elif scheme == "uniform":
        weights = torch.ones(n_steps)
    elif scheme == "linear":
        weights = torch.arange(1, n_steps + 1, dtype=torch.float32)
    else:
        names = ", ".join(repr(s) for s in STEP_WEIGHTS)
        raise ValueError(f"step weights must be one of {names} or a list of {n_steps} "
                         f"non-negative numbers, got {scheme!r}")
    return weights / weights.sum()

# %% [markdown]
# Explicit weights get checked: one per step, finite, non-negative, not all zero. A weight list
# of the wrong length is the likeliest mistake (weights written for 4 steps, a model run for
# 6), and it must not be silently cut or broadcast.

# %%
#| export
def _normalised_weights(weights, n_steps, device):
    """A scheme name or explicit weights -> normalised float32 weights [S] on `device`."""
    if isinstance(weights, str):
        return step_weights(weights, n_steps).to(device)
    try:
        w = torch.as_tensor(weights, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"step weights must be a scheme name or a list of numbers, "
                        f"got {type(weights).__name__}") from None
    if w.ndim != 1 or w.shape[0] != n_steps:
        raise ValueError(f"step weights must hold one weight per step: {n_steps} steps ran, "
                         f"got weights of shape {list(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"step weights must be finite and non-negative, got {w.tolist()}")
    if w.sum() == 0:
        raise ValueError("step weights must not all be zero")
    return (w / w.sum()).to(device)


def weighted_step_loss(step_losses, targets, weights="last"):
    """sum_t w_t L_t, with L_t the mean of step_losses[t] over the learned tokens.

    step_losses [S, B, T] (per-token losses, as LoopOutput.step_losses), targets [B, T] (learned
    where != IGNORE_INDEX), weights a name in STEP_WEIGHTS or S non-negative numbers. The weights
    are normalised to sum to 1, so "last" gives the last step's mean loss. -> scalar tensor.
    """
    if not isinstance(step_losses, torch.Tensor) or step_losses.ndim != 3 or not step_losses.is_floating_point():
        raise ValueError(f"step_losses must be a floating-point tensor [S, B, T], got "
                         f"{list(getattr(step_losses, 'shape', []))}")
    if not isinstance(targets, torch.Tensor) or targets.shape != step_losses.shape[1:]:
        raise ValueError(f"targets must be a tensor [B, T] = {list(step_losses.shape[1:])}, got "
                         f"{list(getattr(targets, 'shape', []))}")
    learned = targets != IGNORE_INDEX                                   # (B, T)
    n_learned = learned.sum()
    if n_learned == 0:
        raise ValueError(f"targets has no position to learn: every entry is IGNORE_INDEX={IGNORE_INDEX}")
    per_step = (step_losses * learned).sum(dim=(1, 2)) / n_learned      # (S,)
    w = _normalised_weights(weights, step_losses.shape[0], step_losses.device)
    return (w * per_step).sum()

# %% [markdown]
# The three schemes for four steps, and the loss each gives on our batch. "last" reproduces
# `out.loss` exactly:

# %% tags=["nbval-check-output"]
for scheme in STEP_WEIGHTS:
    w = step_weights(scheme, 4)
    loss = weighted_step_loss(out.step_losses, targets, scheme)
    print(f"{scheme:8s} w = {[round(x, 3) for x in w.tolist()]}  loss {loss.item():.4f}")
print("last == out.loss:", torch.equal(weighted_step_loss(out.step_losses, targets, "last"), out.loss))

# %% [markdown]
# The test compares against the formula written out with Python loops, for the schemes and for
# explicit weights (which must come out normalised):

# %% tags=["nbval-check-output"]
#| test
import math

import pytest
import torch

from looplm.data import IGNORE_INDEX


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


run_tests(test_weighted_step_loss_matches_the_formula)

# %% [markdown]
# ## 4.2 The gradient of a shared weight
#
# Unroll the loop. Step $t$ computes $h_t = f(h_{t-1}; \theta)$, and every step uses the same
# $\theta$. Imagine instead that step $t$ had its own copy $\theta^{(t)}$, all copies equal to
# $\theta$. The loss is then a function of $S$ separate arguments, and by the chain rule the
# derivative with respect to the shared weight is the sum of the derivatives with respect to
# the copies:
#
# $$
# \frac{\partial \mathcal{L}}{\partial \theta} = \sum_{t=1}^{S} \frac{\partial \mathcal{L}}{\partial \theta^{(t)}},
# \qquad
# \frac{\partial \mathcal{L}}{\partial \theta^{(t)}} =
# \Big(\frac{\partial h_t}{\partial \theta^{(t)}}\Big)^{\!\top} \frac{\partial \mathcal{L}}{\partial h_t}.
# $$

# %% [markdown]
# The gradient with respect to the state flows backwards through the steps, picking up the
# readout's own term at every step that has a loss (backpropagation through time):
#
# $$
# \frac{\partial \mathcal{L}}{\partial h_t} =
# \Big(\frac{\partial h_{t+1}}{\partial h_t}\Big)^{\!\top} \frac{\partial \mathcal{L}}{\partial h_{t+1}}
# + \bar w_t \frac{\partial L_t}{\partial h_t}.
# $$
#
# Autograd does all of this for us: a module used $S$ times simply accumulates $S$ terms into
# its `.grad`. We check both claims: first that autograd's gradient is right, then that it is
# the sum of the per-step terms.

# %% [markdown]
# ### Checking the gradient numerically
#
# `torch.autograd.gradcheck` compares autograd's gradient with finite differences
# $\big(\mathcal{L}(\theta + \epsilon e_i) - \mathcal{L}(\theta - \epsilon e_i)\big) / 2\epsilon$,
# one coordinate at a time. Finite differences need float64 to be accurate. There is one
# obstacle: the package's `RMSNorm` and `token_losses` compute in float32 on purpose (chapter
# 1: they must stay accurate under bfloat16 training), and a float32 step inside a float64
# function spoils the check.

# %% [markdown]
# So the tiny model for the check gets norms that keep their input's dtype (same formula, same
# weights), and the check computes the cross-entropy itself in float64. The model is tiny:
# width 8, 2 heads, 3 loops, 4 positions. The helpers live in a test cell, because the tests
# use them too.

# %% tags=["nbval-check-output"]
#| test
import torch.nn.functional as F
from torch import nn

from looplm.block import RMSNorm
from looplm.model import LoopLM, LoopLMConfig, token_losses


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
print(sum(p.numel() for p in tiny.core.parameters()), "core parameters,",
      {p.dtype for p in tiny.parameters()})

# %% [markdown]
# (The larger `init_std=0.3` makes the untrained blocks do something visible: at the default
# 0.02 every step is close to the identity and the check would be weak.)
#
# To differentiate with respect to the core's weights, we write the loss as a function of
# those weights with `torch.func.functional_call`, which runs the model with the given
# tensors in place of its parameters:

# %% tags=["nbval-check-output"]
#| test
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


run_tests(test_gradcheck_core_weights)

# %% [markdown]
# The test checks twice. In *fast mode*, `gradcheck` compares the derivative of the loss along
# random directions in the space of all 848 core weights, $u^\top \nabla \mathcal{L}$ from
# autograd against the finite difference along $u$. Then, for the attention's output matrix
# $W_o$, it perturbs each of its 64 entries in turn. Both agree within $10^{-6}$ (`gradcheck`
# raises on a mismatch, and the cell would fail).

# %% [markdown]
# ### The gradient is a sum over steps
#
# Now the per-step terms. We untie the weights by hand: every step gets its own copy
# $\theta^{(t)}$ of the core's parameters, again through `functional_call`, and autograd gives
# the gradient with respect to each copy separately.

# %%
def per_step_core_grads(model, idx, targets, n_loops):
    """[{name: dL/dθ^(t)}] for t = 1..S: the core run with a separate copy of its weights per step."""
    cos, sin = model.rope(idx.shape[1])
    copies = [{name: p.detach().clone().requires_grad_() for name, p in model.core.named_parameters()}
              for _ in range(n_loops)]
    x0 = model.encode(idx, cos, sin)
    h = model.init_state(x0)
    for t in range(n_loops):
        h = model.injection(h, x0)
        for i, block in enumerate(model.core):                 # block i with step t's copy
            mine = {name.split(".", 1)[1]: p for name, p in copies[t].items() if name.startswith(f"{i}.")}
            h = torch.func.functional_call(block, mine, (h, cos, sin))
    logits, _ = model.readout(h, cos, sin)
    loss = float64_loss(logits[None], targets)
    grads = torch.autograd.grad(loss, [p for copy in copies for p in copy.values()])
    names = list(copies[0])
    return [dict(zip(names, grads[t * len(names):(t + 1) * len(names)])) for t in range(n_loops)]

# %% [markdown]
# The sum of the three per-step gradients against the gradient autograd accumulates in the
# tied model:

# %% tags=["nbval-check-output"]
idx_tiny = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(1))
targets_tiny = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(2))
tiny.zero_grad()
float64_loss(tiny(idx_tiny).logits, targets_tiny).backward()
per_step = per_step_core_grads(tiny, idx_tiny, targets_tiny, n_loops=3)
same = all(torch.allclose(sum(g[name] for g in per_step), p.grad, rtol=1e-12, atol=1e-15)
           for name, p in tiny.core.named_parameters())
print("sum over steps == tied gradient (to 1e-12):", same)
for t, g in enumerate(per_step, 1):
    print(f"step {t}: |dL/dθ^({t})| = {torch.cat([x.flatten() for x in g.values()]).norm():.4f}")

# %% [markdown]
# The sum matches to rounding. Every step contributes: with a loss on the last step only, the
# first step's weights still matter because everything after depends on its output. The
# sizes differ, and how they differ is a property of the trained network's Jacobians
# $\partial h_{t+1} / \partial h_t$. If those shrink vectors, early steps contribute little
# (vanishing gradients through depth); if they stretch them, early steps dominate.

# %% [markdown]
# The test states the same thing for a model with a 2-block core and an input injection-free
# loop of 4 steps:

# %% tags=["nbval-check-output"]
#| test
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


run_tests(test_tied_gradient_is_sum_of_per_step_gradients)

# %% [markdown]
# ## 4.3 Activation memory grows with every step
#
# The backward pass needs some of the forward pass's intermediate tensors: the input of every
# linear layer (to form the weight's gradient), the softmax output of attention, the gate of
# the SwiGLU, and so on. Autograd saves them as the forward pass runs. A looped model runs
# the core $S$ times, and each run saves its own intermediates, because they differ from step
# to step even though the weights do not. So activation memory is about
#
# $$
# \text{memory}(S) \approx a + b\, S,
# $$
#
# where $b$ is what one step of the core and its readout save, and $a$ is everything else.

# %% [markdown]
# We can measure it exactly. `torch.autograd.graph.saved_tensors_hooks` installs a function
# that autograd calls on every tensor it saves for backward. Our hook records each tensor's
# storage, the memory block behind it. Many saved tensors are views of one storage (a
# transposed weight, a slice of the fused `qkv` output), so counting storages rather than
# tensors avoids counting the same bytes twice. The parameters themselves are saved too; we
# leave them out, since they exist anyway.

# %%
#| export
def saved_tensor_bytes(fn, exclude=()):
    """Run fn(); return (bytes autograd saved for backward while it ran, fn's result).

    Counts each distinct storage once (many saved tensors are views of one storage). Storages
    of the tensors in `exclude` (e.g. model.parameters(), which exist anyway) are not counted.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    sizes = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return sum(sizes.values()), result

# %% [markdown]
# One training forward pass (model and loss) at $S = 1, \dots, 8$ steps, on a batch of 16
# sequences of 32 positions:

# %% tags=["nbval-check-output"]
B, T = 16, 32
idx_mem = torch.randint(0, TASK_VOCAB.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
targets_mem = torch.randint(0, TASK_VOCAB.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
mem_model = LoopLM(LoopLMConfig(TASK_VOCAB.vocab_size, 64, 4, max_seq_len=T))
params = list(mem_model.parameters())
steps = np.arange(1, 9)
plain = [saved_tensor_bytes(lambda: mem_model(idx_mem, targets=targets_mem, n_loops=int(S)).loss, params)[0]
         for S in steps]
slope, intercept = np.polyfit(steps, plain, 1)
print("saved bytes:", plain)
print(f"fit: {intercept / 2**10:.1f} KiB + {slope / 2**10:.1f} KiB per step")

# %% [markdown]
# The growth is exactly linear: every step adds the same bytes. How much is that per step?
# A natural unit is one hidden state, $B \cdot T \cdot d$ float32 numbers
# ($16 \cdot 32 \cdot 64 \cdot 4$ bytes $= 128$ KiB):

# %% tags=["nbval-check-output"]
state_bytes = B * T * mem_model.config.d_model * 4
print(f"one step saves {slope / state_bytes:.2f} hidden states' worth of tensors")

# %% [markdown]
# About 26.5 hidden states per step for one pre-norm block and its readout: the norm inputs,
# $q$, $k$ and $v$ before and after rope, the attention output, the SwiGLU's three hidden-size
# tensors ($d_{\text{hidden}} = 176 = 2.75\,d$ here), the readout's norm, logits and
# log-probabilities. A 64-step model at this size would need 64 times as much; a Huginn-sized
# model at $r = 32$ runs into the limits of a GPU. Two ways out follow.

# %% [markdown]
# ## 4.4 A loop runner for training
#
# `LoopLM.forward` runs every step with autograd recording. For training we want two knobs it
# does not have.

# %% [markdown]
# **Truncated backpropagation** (Huginn; Yang et al. in a windowed form). Run the first
# $S - k$ steps under `torch.no_grad()`: they record nothing and save nothing. Only the last
# $k$ steps are differentiated, so memory is that of a $k$-step model whatever $S$ is. The
# price: the gradient is no longer the full sum of section 4.2, only its last $k$ terms, and
# nothing flows back into $h_{S-k}$ or into the early steps' readouts.
#
# One consequence is easy to miss. Without input injection, the input reaches the loop only
# through $h_0$, so truncation also cuts the embedding and the prelude out of the gradient
# (a tied head still trains the embedding). With injection (chapter 3) the input enters every
# step, including the last $k$, and keeps getting gradient; Huginn injects. TRM takes the
# idea further: its state is carried from one supervision step to the next *detached*, so
# each step of supervision backpropagates through one short stretch of the loop only.

# %% [markdown]
# **Activation checkpointing** (Chen et al., arXiv 1604.06174, "Training deep nets with
# sublinear memory cost"). Wrap each step in `torch.utils.checkpoint.checkpoint`: during the
# forward pass the step saves only its inputs; during the backward pass it runs again, this
# time saving its intermediates, and they are used and freed right away. The gradient is
# exact, the memory per step drops to one hidden state plus what the readout's loss keeps,
# and the cost is a second forward pass of every step.

# %% [markdown]
# The runner is built from the model's parts, `encode`, `init_state`, `step` and `readout`,
# so everything chapter 3 and later chapters put behind those methods (injections, initial
# states, the exit gate) keeps working. A third knob, `readout="last"`, skips the readouts of
# all steps but the last, for losses that do not use them (section 4.10 measures what that
# saves).

# %%
#| export
def _check_grad_steps(grad_steps, n_loops):
    if grad_steps is None:
        return
    _require_int("grad_steps", grad_steps, 1)
    if grad_steps > n_loops:
        raise ValueError(f"grad_steps must be <= n_loops: {n_loops} steps run, so at most {n_loops} "
                         f"can get gradients; got grad_steps={grad_steps}")


def _step_and_readout(model, h, x0, cos, sin, read):
    """One loop step, then (if read) its readout: -> (h_t, logits_t or None, gate_t or None)."""
    h = model.step(h, x0, cos, sin)                                 # (B, T, D)
    if not read:
        return h, None, None
    logits, z = model.readout(h, cos, sin)                          # (B, T, V), (B, T, D)
    gate = model.exit_gate(z) if model.exit_gate is not None else None   # (B, T)
    return h, logits, gate

# %% [markdown]
# The loop itself. Steps $1, \dots, S - k$ run without gradients; their readouts are still
# computed and returned (detached), so the output has the same fields as `model(...)`. The
# remaining steps run with autograd, each inside a checkpoint if asked.

# %%
#| export
def loop_forward(model, idx, targets=None, n_loops=None, grad_steps=None, checkpoint=False,
                 return_hidden=False, readout="all"):
    """Run a LoopLM for training: model(idx, targets, n_loops, return_hidden) with two extra knobs.

    grad_steps=k: only the last k of the S steps get gradients (truncated backpropagation, as
    Huginn): steps 1..S-k run under torch.no_grad(), their readouts are returned detached.
    checkpoint=True: each step with gradients runs inside torch.utils.checkpoint (non-reentrant),
    saving only its inputs and recomputing the rest during backward. Exact gradients.
    readout="last": read out the last step only (logits [1, B, T, V], step_losses [1, B, T]).
    Forward values equal model(idx, targets=...) exactly. -> LoopOutput.
    """
    c = model.config
    _check_token_ids("idx", idx, c.vocab_size, c.max_seq_len)
    if targets is not None:
        _check_targets(targets, idx, c.vocab_size)
    n_loops = c.n_loops if n_loops is None else n_loops
    _require_int("n_loops", n_loops, 1)
    _check_grad_steps(grad_steps, n_loops)
    _require_bool("checkpoint", checkpoint)
    _require_bool("return_hidden", return_hidden)
    if readout not in ("all", "last"):
        raise ValueError(f"readout must be 'all' or 'last', got {readout!r}")
    if readout == "last" and model.exit_gate is not None:
        raise ValueError("readout='last' cannot be used with an exit gate: the gate needs every step's readout")
    first_grad_step = 0 if grad_steps is None else n_loops - grad_steps

    cos, sin = model.rope(idx.shape[1])                             # (T, hs/2) each
    x0 = model.encode(idx, cos, sin)                                # (B, T, D)
    h = model.init_state(x0)                                        # h_0: (B, T, D)
    logits, gates, hidden = [], [], []
    for t in range(n_loops):
        read = readout == "all" or t == n_loops - 1
        if t < first_grad_step:
            with torch.no_grad():
                h, step_logits, gate = _step_and_readout(model, h, x0, cos, sin, read)
        elif checkpoint and torch.is_grad_enabled():
            h, step_logits, gate = _activation_checkpoint(_step_and_readout, model, h, x0, cos, sin,
                                                          read, use_reentrant=False)
        else:
            h, step_logits, gate = _step_and_readout(model, h, x0, cos, sin, read)
        if read:
            logits.append(step_logits)
            gates.append(gate)
        if return_hidden:
            hidden.append(h)

    out = LoopOutput(logits=torch.stack(logits))                    # (S, B, T, V); S = 1 for "last"
    if model.exit_gate is not None:
        out.gate = torch.stack(gates)                               # (S, B, T)
        out.exit_probs = model.exit_gate.exit_probs(out.gate)
    if return_hidden:
        out.hidden = torch.stack(hidden)                            # (S, B, T, D)
    if targets is not None:
        out.step_losses = token_losses(out.logits, targets)         # (S, B, T)
        out.loss = out.step_losses[-1].sum() / (targets != IGNORE_INDEX).sum()
    return out

# %% [markdown]
# ### Same values as the model
#
# With no knob turned, `loop_forward` is `model(...)` written differently: the same operations
# in the same order. So the outputs must be *identical*, bit for bit, not merely close. And
# since truncation and checkpointing only change what the backward pass sees, the forward
# values must be identical with them too:

# %% tags=["nbval-check-output"]
reference = model(idx, targets=targets, return_hidden=True)
for knobs in [{}, {"checkpoint": True}, {"grad_steps": 2}, {"grad_steps": 1, "checkpoint": True}]:
    mine = loop_forward(model, idx, targets=targets, return_hidden=True, **knobs)
    same = all(torch.equal(getattr(mine, f), getattr(reference, f))
               for f in ("logits", "step_losses", "loss", "hidden"))
    print(f"{str(knobs):36s} identical to model(...): {same}")

# %% [markdown]
# ### Same gradients
#
# Without truncation, the gradients must equal plain autograd's, with and without
# checkpointing. Recomputation repeats the same operations on the same inputs, so on a CPU
# the gradients come out identical too:

# %%
def gradients(model, loss_fn):
    """{name: grad} of every parameter after loss_fn().backward()."""
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def max_grad_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)

# %% tags=["nbval-check-output"]
loss_of = lambda out: weighted_step_loss(out.step_losses, targets, "uniform")   # noqa: E731
plain_grads = gradients(model, lambda: loss_of(model(idx, targets=targets)))
for ck in (False, True):
    runner_grads = gradients(model, lambda: loss_of(loop_forward(model, idx, targets, checkpoint=ck)))
    print(f"checkpoint={ck}: max |grad difference| = {max_grad_difference(plain_grads, runner_grads):.1e}")

# %% [markdown]
# The tests pin both properties on a model with a prelude, a 2-block core, a coda and an
# untied head, so that every part of the runner is exercised:

# %% tags=["nbval-check-output"]
#| test
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


run_tests(test_loop_forward_equals_model_forward, test_checkpointing_gives_the_same_gradients)

# %% [markdown]
# ### Truncation cuts the early steps out of the gradient
#
# With `grad_steps=k`, the gradient must be what autograd gives when the state is *detached*
# after step $S - k$: the last $k$ terms of the sum of section 4.2 and nothing else. The
# by-hand version below does exactly that with `.detach()`, and the early steps' readouts are
# detached too, so they add nothing.

# %%
def truncated_by_hand(model, idx, targets, n_loops, k):
    """The loss of the last step, backpropagated through the last k steps only (via detach)."""
    cos, sin = model.rope(idx.shape[1])
    x0 = model.encode(idx, cos, sin)
    h = model.init_state(x0)
    for t in range(n_loops):
        if t == n_loops - k > 0:
            h = h.detach()                          # nothing flows back past h_{S-k}
        h = model.step(h, x0, cos, sin)
    logits, _ = model.readout(h, cos, sin)
    return token_losses(logits[None], targets)[0].sum() / (targets != IGNORE_INDEX).sum()

# %% tags=["nbval-check-output"]
full = gradients(model, lambda: loop_forward(model, idx, targets).loss)
for k in (4, 2, 1):
    truncated = gradients(model, lambda: loop_forward(model, idx, targets, grad_steps=k).loss)
    by_hand = gradients(model, lambda: truncated_by_hand(model, idx, targets, 4, k))
    print(f"grad_steps={k}: vs by hand {max_grad_difference(truncated, by_hand):.1e}, "
          f"vs full backprop {max_grad_difference(truncated, full):.1e}")

# %% [markdown]
# With $k = S = 4$ truncation changes nothing. With $k < S$ the gradient matches the by-hand
# version exactly and differs from the full one: the early steps' terms are gone. The test
# also checks the consequence for the *readouts*: with a loss on every step, the losses of
# the no-grad steps contribute no gradient at all.

# %% tags=["nbval-check-output"]
#| test
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


run_tests(test_truncated_backprop_drops_the_early_steps)

# %% [markdown]
# ### What each knob saves
#
# Back to the memory measurement, now with the runner: plain, checkpointed, and truncated to
# the last two steps.

# %% tags=["nbval-check-output"]
def runner_bytes(**knobs):
    """Saved-tensor bytes of loop_forward's loss for S = 1..8."""
    return [saved_tensor_bytes(lambda: loop_forward(mem_model, idx_mem, targets_mem, n_loops=int(S), **knobs).loss,
                               params)[0] for S in steps]


def truncated_bytes(**knobs):
    """The same, backpropagating through the last min(2, S) steps."""
    return [saved_tensor_bytes(lambda: loop_forward(mem_model, idx_mem, targets_mem, n_loops=int(S),
                                                    grad_steps=min(2, int(S)), **knobs).loss, params)[0]
            for S in steps]


memory = {"plain": plain, "checkpoint=True": runner_bytes(checkpoint=True),
          "grad_steps=2": truncated_bytes(), 'grad_steps=2, readout="last"': truncated_bytes(readout="last")}
for name, values in memory.items():
    print(f"{name:29s} S=1: {values[0] / 2**10:7.1f} KiB   S=8: {values[-1] / 2**10:8.1f} KiB   "
          f"S=4 to 8: {(values[-1] - values[3]) / 4 / 2**10:7.1f} KiB per step")

# %%
fig, ax = plt.subplots(figsize=(6, 3.8))
for name, values in memory.items():
    ax.plot(steps, np.array(values) / 2**20, marker="o", label=name)
ax.set(xlabel="loop steps S", ylabel="saved for backward (MiB)",
       title="Activation memory of one training forward pass")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Checkpointing cuts the slope by a factor of about 19: each step now keeps its input state
# (one hidden state, 128 KiB) and the readout's loss keeps its log-probabilities (50 KiB), and
# that is all. Truncation makes the line almost flat once $S > k$: the memory of a two-step
# model, plus what the loss keeps for the readouts of the no-grad steps, whose losses are
# computed with the others. With `readout="last"` that remainder goes too.
#
# Equal gradients (the test above) cannot tell whether checkpointing happened at all: a
# `loop_forward` that ignored `checkpoint=True` would pass it. The saved bytes can, so a test
# pins them too, on a tiny model run for 6 steps: checkpointed, it must save less than half.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def test_checkpointing_saves_less_for_backward():
    model = _full_model(5)
    idx, targets = _batch(5)
    params = list(model.parameters())

    def saved(checkpoint):
        return saved_tensor_bytes(lambda: loop_forward(model, idx, targets, n_loops=6, checkpoint=checkpoint).loss,
                                  params)[0]

    plain, checkpointed = saved(False), saved(True)
    assert 0 < checkpointed < plain / 2, (plain, checkpointed)


run_tests(test_checkpointing_saves_less_for_backward)

# %% [markdown]
# Checkpointing's price is time: every step runs forward twice. The next cell times a full
# training step (forward, backward, optimizer) both ways, as the median of several runs.
# Timings vary from machine to machine and run to run, so this cell is not checked.

# %% tags=["timing"]
def median_step_seconds(loss_fn, model, repeats=9, warmup=2):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


timing_model = LoopLM(LoopLMConfig(TASK_VOCAB.vocab_size, 64, 4, n_loops=8, max_seq_len=T))
samples = {False: [], True: []}
for ck in (False, True, True, False, False, True):            # alternate, so drift hits both alike
    samples[ck].append(median_step_seconds(
        lambda: loop_forward(timing_model, idx_mem, targets_mem, checkpoint=ck).loss, timing_model,
        repeats=3, warmup=1))
plain_s, ckpt_s = statistics.median(samples[False]), statistics.median(samples[True])
print(f"8 steps, one training step: plain {plain_s * 1e3:.1f} ms, checkpointed {ckpt_s * 1e3:.1f} ms "
      f"({ckpt_s / plain_s - 1:+.0%})")

# %% [markdown]
# In arithmetic, the backward pass costs about twice the forward, so recomputing the forward
# adds about a third to a training step. The measured cost here is what the cell printed; on
# a small model on a CPU, where the time goes into many small operations rather than into
# arithmetic, running every step twice costs more than that count suggests. Measure on your
# own hardware before choosing: the memory saving is certain, the time cost depends on it.

# %% [markdown]
# ## 4.5 Gradient size and depth
#
# Section 4.2 showed that the core's gradient is a sum of $S$ per-step terms. If the terms are
# of similar size and point in similar directions, the sum grows like $S$; the embedding and
# the head, used once, see no such growth. Counting terms, then, the core's gradient could be
# up to $S$ times larger in an $S$-step loop than in one step. Let us measure it instead of
# assuming it.

# %% [markdown]
# For $S = 1, \dots, 16$ we take one batch, backpropagate the last step's loss and record the
# gradient norm of the core's weights and of everything else. Two models: one untrained, one
# after a short training run at 4 steps (200 steps of AdamW), because an untrained model's
# steps barely change the state and tell us little about a working loop.

# %%
def grad_norms(model, idx, targets, n_loops):
    """(|grad| of the core's weights, |grad| of all other weights) for the last step's loss."""
    model.zero_grad(set_to_none=True)
    loop_forward(model, idx, targets, n_loops=n_loops).loss.backward()
    core = torch.cat([p.grad.flatten() for p in model.core.parameters()]).norm().item()
    rest = torch.cat([p.grad.flatten() for name, p in model.named_parameters()
                      if not name.startswith("core.") and p.grad is not None]).norm().item()
    return core, rest

# %% [markdown]
# A short training run for the second model, written out by hand (chapter 3's `Trainer` does
# the same with more care):

# %%
def quick_train(model, n_steps, n_loops, lr=3e-3, seed=0):
    """n_steps of AdamW on the stack data at a fixed depth; returns the model."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        rows = torch.randint(0, len(train_data.idx), (32,), generator=generator)
        loss = loop_forward(model, train_data.idx[rows], train_data.targets[rows], n_loops=n_loops).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model


_ = torch.manual_seed(0)
fresh = LoopLM(config)
_ = torch.manual_seed(0)
trained = quick_train(LoopLM(config), n_steps=200, n_loops=4)
batch_idx, batch_targets = test_data.idx[:64], test_data.targets[:64]
depths = [1, 2, 3, 4, 6, 8, 12, 16]
norms = {name: np.array([grad_norms(m, batch_idx, batch_targets, S) for S in depths])
         for name, m in (("untrained", fresh), ("trained at S=4", trained))}
for name, values in norms.items():
    print(f"{name:15s} core |grad| at S=1, 4, 16: {values[0, 0]:.3f}, {values[3, 0]:.3f}, {values[-1, 0]:.3f}"
          f"   rest: {values[0, 1]:.3f}, {values[3, 1]:.3f}, {values[-1, 1]:.3f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=False)
for ax, (name, values) in zip(axes, norms.items()):
    ax.plot(depths, values[:, 0], marker=".", label="core")
    ax.plot(depths, values[:, 0] / np.array(depths), marker=".", label="core, scaled by 1/S")
    ax.plot(depths, values[:, 1], marker=".", label="embedding, norms, head")
    ax.set(xlabel="loop steps S", ylabel="gradient norm", title=name, yscale="log")
axes[0].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Two different pictures.
#
# - **Untrained**: the core's gradient grows with $S$, but much more slowly than $S$: about
#   5.4 times larger at 16 steps than at 1. The per-step terms are not equal and not aligned,
#   so their sum grows sublinearly. "$S$ times larger" is an upper bound, not what happens.
#   Divided by $S$, the gradient *shrinks* with depth instead. Neither line is flat.
# - **Trained at $S = 4$**: the gradient is smallest at the trained depth and large on either
#   side. The loss is small at $S = 4$ and large elsewhere (the next sections show the model
#   failing away from its trained depth), and the gradient follows the loss, not the step
#   count.
#
# So there is no fixed correction that makes the gradient independent of depth.
# %% [markdown]
# Scaling the core's gradient is two lines. A training loop that wants it calls it between
# `backward()` and `optimizer.step()`:

# %%
#| export
def scale_core_grads(model, factor):
    """Multiply the .grad of every core parameter by `factor` (e.g. 1 / n_loops), in place."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
        raise ValueError(f"factor must be a finite number, got {factor!r}")
    for p in model.core.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)

# %% [markdown]
# How much does the size of the gradient matter? Less than one might think, because of how
# Adam works. Adam divides each coordinate's step by a running root-mean-square of its own
# gradients, so multiplying one parameter's gradients by a constant $c$ multiplies both the
# numerator and the denominator by $c$, and the update is the same (up to the tiny $\epsilon$
# in the denominator). One AdamW step from the same gradients, scaled and unscaled:

# %% tags=["nbval-check-output"]
def adam_update(grad_scale, eps=1e-8):
    """The change one AdamW step makes to the core's weights, with the core's gradients scaled."""
    _ = torch.manual_seed(0)
    m = LoopLM(config)
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3, eps=eps)
    loop_forward(m, batch_idx, batch_targets, n_loops=8).loss.backward()
    scale_core_grads(m, grad_scale)
    before = [p.detach().clone() for p in m.core.parameters()]
    optimizer.step()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(m.core.parameters(), before)])


for eps in (1e-8, 1e-12):
    change = (adam_update(1 / 8, eps) - adam_update(1.0, eps)).norm() / adam_update(1.0, eps).norm()
    print(f"AdamW eps={eps:.0e}: core gradients x 1/8 change the update by {change.item():.1e} (relative)")

# %% [markdown]
# The difference that remains comes from $\epsilon$: coordinates whose gradients are as small
# as $\epsilon$ are the only ones where the scale shows, and with a smaller $\epsilon$ the
# difference shrinks by orders of magnitude. So with Adam a *constant* $1/S$ changes almost
# nothing. It matters in two places:
#
# - **gradient clipping**, which looks at the norm of *all* gradients together. If the core's
#   gradient grows with $S$, a deep loop is clipped harder, and the embedding and head, whose
#   gradients did not grow, get shrunk along with it.
# - **varying depth** (next section). When $S$ changes from batch to batch, an unscaled sum
#   gives deep batches more weight in Adam's running averages than shallow ones; $1/S$
#   puts them on an equal footing.
#
# The loss function of section 4.7 offers the scaling as an option, `scale_core_grad=True`.

# %% [markdown]
# ## 4.6 Randomized depth
#
# A model trained at exactly $S$ steps learns to produce its answer *at step $S$*. Nothing
# asks it to keep the answer at step $S + 1$, and chapter 3 saw what it does there. Huginn
# draws the step count afresh for every batch, from a heavy-tailed distribution:
#
# $$
# \tau \sim \mathcal{N}\!\Big(\log \bar r - \tfrac12 \sigma^2,\; \sigma\Big), \qquad
# r \sim \mathrm{Poisson}\big(e^{\tau}\big) + 1, \qquad \sigma = \tfrac12 .
# $$

# %% [markdown]
# The rate $e^\tau$ is log-normal, and the $-\frac12\sigma^2$ makes its mean exactly $\bar r$:
# $\mathbb{E}[e^\tau] = e^{\log \bar r - \sigma^2/2 + \sigma^2/2} = \bar r$. Given the rate, the
# Poisson draw has that mean, so
#
# $$
# \mathbb{E}[r] = \bar r + 1,
# $$
#
# the $+1$ guaranteeing at least one step. (Huginn calls $\bar r$ the mean recurrence; with
# $\bar r = 32$ its expected depth is 33 steps.) The log-normal rate gives the distribution a
# long right tail: most batches run near $\bar r$, a few run two or three times as deep.

# %%
#| export
def sample_depth(mean_steps, sigma=0.5, generator=None):
    """A step count r = Poisson(exp(tau)) + 1, tau ~ Normal(log(mean_steps) - sigma^2 / 2, sigma).

    Huginn's depth sampler (arXiv 2502.05171). E[exp(tau)] = mean_steps, so E[r] = mean_steps + 1.
    `generator` (a torch.Generator) makes the draws reproducible. -> int >= 1.
    """
    if (isinstance(mean_steps, bool) or not isinstance(mean_steps, (int, float))
            or not math.isfinite(mean_steps) or mean_steps <= 0):
        raise ValueError(f"mean_steps must be a finite number > 0, got {mean_steps!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    tau = math.log(mean_steps) - sigma**2 / 2 + sigma * torch.randn((), generator=generator, dtype=torch.float64)
    return int(torch.poisson(tau.exp(), generator=generator).item()) + 1

# %% [markdown]
# Twenty thousand draws at $\bar r = 4$, against the exact distribution. The exact
# probabilities are an average of Poisson probabilities over the normal $\tau$, which
# Gauss–Hermite quadrature computes to many digits:

# %%
def depth_pmf(mean_steps, sigma, max_steps):
    """P(r = 1..max_steps) for sample_depth's distribution, by Gauss-Hermite quadrature over tau."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)           # for E over N(0, 1)
    rates = np.exp(math.log(mean_steps) - sigma**2 / 2 + sigma * nodes)
    n = np.arange(max_steps)[:, None]                                  # r - 1 = 0 .. max_steps-1
    log_poisson = n * np.log(rates) - rates - np.array([math.lgamma(k + 1) for k in range(max_steps)])[:, None]
    return (np.exp(log_poisson) * weights).sum(1) / weights.sum()

# %% tags=["nbval-check-output"]
generator = torch.Generator().manual_seed(0)
draws = np.array([sample_depth(4, 0.5, generator) for _ in range(20_000)])
pmf = depth_pmf(4, 0.5, 30)
print(f"sample mean {draws.mean():.3f}, formula r̄ + 1 = 5, exact mean {(np.arange(1, 31) * pmf).sum():.3f}")
print(f"P(r >= 10): sample {(draws >= 10).mean():.4f}, exact {pmf[9:].sum():.4f};  largest draw {draws.max()}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.hist(draws, bins=np.arange(0.5, 20.5), density=True, alpha=0.6, label="20,000 draws")
ax.plot(np.arange(1, 20), pmf[:19], "k.-", label="exact distribution")
ax.axvline(5, color="C3", linestyle="--", label=r"mean $\bar r + 1 = 5$")
ax.set(xlabel="steps r", ylabel="probability", title=r"Huginn's depth distribution, $\bar r = 4$, $\sigma = 1/2$")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The test checks reproducibility (the same generator state gives the same draws) and the
# mean, over enough draws that the tolerance is five standard errors:

# %% tags=["nbval-check-output"]
#| test
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


run_tests(test_sample_depth_is_reproducible_and_has_the_stated_mean)

# %% [markdown]
# ## 4.7 A loss function for the Trainer
#
# Chapter 3's `Trainer` takes a `loss_fn(model, idx, targets) -> (loss, metrics)`. This
# section builds one that collects every option of this chapter. Before that, two optional
# regularizers of our own making, each aimed at a failure of deep loops: a penalty that keeps
# the state's size steady from step to step, and a loss that asks every step's prediction to
# agree with the last one's.

# %% [markdown]
# **Hidden-norm stabilization.** Chapter 2 watched the state $h_t$ grow step after step. A
# growing state is a loop that has not settled, and it is what makes runs at large $S$ blow
# up: OpenMythos, a third-party looped transformer, reports in its pull request
# kyegomez/OpenMythos#79 that at $T \ge 32$ loop steps the norm of the state and the gradients
# blow up. The penalty asks the root-mean-square size of the state to stay put from one step
# to the next:
#
# $$
# P_{\text{norm}} = \frac{1}{S - 1} \sum_{t=2}^{S} \operatorname{mean}_{b, i}
# \Big(\log \operatorname{rms}(h_{t, b, i}) - \log \operatorname{rms}(h_{t-1, b, i})\Big)^2,
# \qquad \operatorname{rms}(h) = \sqrt{\tfrac1d \textstyle\sum_j h_j^2}.
# $$
#
# In logs, so that it penalises *relative* growth and does not care about the state's overall
# scale; it starts at $t = 2$, because $h_0$ is the embedding, whose scale is set by its
# initialisation and not by the loop.

# %% [markdown]
# **Cross-step consistency.** Ask every step's prediction to agree with the last step's:
#
# $$
# P_{\text{cons}} = \frac{1}{S-1} \sum_{t=1}^{S-1} \operatorname{mean}_{(b, i) \in M}\;
# \mathrm{KL}\big(\operatorname{sg}(p_S) \,\|\, p_t\big),
# $$
#
# with $\operatorname{sg}$ a stop-gradient: the last step is the teacher and is not pulled
# towards the earlier ones. This is self-distillation along depth, the idea of "Be Your Own
# Teacher" (Zhang et al., arXiv 1905.08094), where a network's deepest classifier teaches its
# shallower ones, applied to the steps of a loop. It gives early readouts a target even on
# tokens where the label is uncertain, which is what an early exit needs.

# %%
#| export
def hidden_norm_penalty(hidden):
    """Mean over steps t = 2..S and positions of (log rms(h_t) - log rms(h_{t-1}))^2.

    hidden [S, B, T, D] (LoopOutput.hidden) -> scalar; 0 when S == 1.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 4:
        raise ValueError(f"hidden must be a tensor [S, B, T, D], got {list(getattr(hidden, 'shape', []))}")
    log_rms = 0.5 * hidden.float().pow(2).mean(dim=-1).clamp_min(1e-20).log()   # (S, B, T)
    if hidden.shape[0] < 2:
        return log_rms.sum() * 0.0
    return (log_rms[1:] - log_rms[:-1]).pow(2).mean()


def step_consistency(logits, targets):
    """Mean over steps t < S of KL(sg(p_S) || p_t) at the learned positions (p_S detached).

    logits [S, B, T, V], targets [B, T] -> scalar; 0 when S == 1.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4:
        raise ValueError(f"logits must be a tensor [S, B, T, V], got {list(getattr(logits, 'shape', []))}")
    learned = targets != IGNORE_INDEX                                  # (B, T)
    log_p = logits.float().log_softmax(dim=-1)[:, learned]             # (S, M, V)
    if logits.shape[0] < 2:
        return log_p.sum() * 0.0
    teacher = log_p[-1].detach()                                       # (M, V)
    kl = (teacher.exp() * (teacher - log_p[:-1])).sum(dim=-1)          # (S-1, M)
    return kl.mean()

# %% [markdown]
# On our untrained model both are small but not zero:

# %% tags=["nbval-check-output"]
out = model(idx, targets=targets, return_hidden=True)
print(f"norm penalty {hidden_norm_penalty(out.hidden).item():.5f}, "
      f"consistency {step_consistency(out.logits, targets).item():.5f}")

# %% [markdown]
# Now the loss function. `LoopLoss` holds the options and is called like a function. The
# options and what they do:
#
# | option | effect |
# |---|---|
# | `step_weights` | `"last"`, `"uniform"`, `"linear"` or one weight per step (section 4.1) |
# | `grad_steps` | backpropagate through the last $k$ steps only (4.4); with a sampled depth $r < k$, all $r$ |
# | `checkpoint` | activation checkpointing per step (4.4) |
# | `sample_depth` | `None`: the model's `n_loops`; a number $\bar r$: Huginn's sampler per batch (4.6) |
# | `norm_penalty`, `consistency` | weights of the two regularizers above |
# | `scale_core_grad` | scale the core's gradient by $1 / (\text{steps with gradient})$ (4.5) |
#
# The published recipes are settings of these options. Huginn: `sample_depth=r̄, grad_steps=8`
# with the default `"last"` weights. Yang et al.'s windowed loss over the last $w$ of $S$
# steps: `step_weights=[0] * (S - w) + [1] * w, grad_steps=w`. Ouro's stage I (chapter 5)
# weights every step too, by the exit gate's probability of stopping there: weights that are
# learned, per token.

# %% [markdown]
# Two details. The depth sampler has its own random generator, seeded by `seed`, and the loss
# function can save and restore its state (`state_dict`), so that a resumed training run
# draws the same depths as an uninterrupted one. And when only the last readout is used
# (weights `"last"`, no consistency term, no exit gate), the loss asks `loop_forward` for the
# last readout only.

# %% [markdown]
# The core-gradient scaling has to happen during `backward()`, which the `Trainer` calls, not
# the loss function. So the loss function registers a hook on each core parameter
# (`Tensor.register_hook`) that scales the gradient arriving there and then removes itself:
# it acts on exactly one backward pass. A parameter used in $S$ steps receives its summed
# gradient once, so one hook call scales the whole sum.

# %%
#| export
_named_step_weights, _draw_depth = step_weights, sample_depth   # LoopLoss's arguments shadow these names


def _one_shot_scale(p, factor):
    handle = None

    def hook(grad):
        handle.remove()                     # fire on one backward pass only
        return grad * factor

    handle = p.register_hook(hook)
    return handle


class LoopLoss:
    """A loss_fn(model, idx, targets) -> (loss, metrics) for chapter 3's Trainer.

    loss = weighted_step_loss(step_losses, targets, step_weights)
           + norm_penalty * hidden_norm_penalty(hidden) + consistency * step_consistency(logits)
    run by loop_forward at depth S = model.config.n_loops, or S ~ sample_depth(sample_depth,
    sigma) per call (own generator, seeded by `seed`; state_dict()/load_state_dict() save it).
    grad_steps=k: backprop through the last min(k, S) steps; checkpoint: per-step checkpointing;
    scale_core_grad: the core's gradient is scaled by 1 / (steps with gradient).
    """

    def __init__(self, step_weights="last", grad_steps=None, checkpoint=False, sample_depth=None,
                 sigma=0.5, norm_penalty=0.0, consistency=0.0, scale_core_grad=False, seed=0):
        if isinstance(step_weights, str):
            _named_step_weights(step_weights, 1)                           # raises on an unknown name
        elif sample_depth is not None:
            raise ValueError("explicit step weights need a fixed depth; with sample_depth use "
                             f"one of {', '.join(repr(s) for s in STEP_WEIGHTS)}")
        else:
            step_weights = _normalised_weights(step_weights, len(step_weights), "cpu")  # checks them
        if grad_steps is not None:
            _require_int("grad_steps", grad_steps, 1)
        _require_bool("checkpoint", checkpoint)
        _require_bool("scale_core_grad", scale_core_grad)
        if sample_depth is not None:
            _draw_depth(sample_depth, sigma, torch.Generator())            # validates both
        for name, value in (("norm_penalty", norm_penalty), ("consistency", consistency)):
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        _require_int("seed", seed, 0)
        self.step_weights, self.grad_steps, self.checkpoint = step_weights, grad_steps, checkpoint
        self.sample_depth, self.sigma, self.seed = sample_depth, sigma, seed
        self.norm_penalty, self.consistency = float(norm_penalty), float(consistency)
        self.scale_core_grad = scale_core_grad
        self.generator = torch.Generator().manual_seed(seed)
        self._pending = []

    def depth(self, model):
        """The step count for the next batch."""
        if self.sample_depth is None:
            return model.config.n_loops
        return _draw_depth(self.sample_depth, self.sigma, self.generator)

    def __call__(self, model, idx, targets):
        n_loops = self.depth(model)
        grad_steps = None if self.grad_steps is None else min(self.grad_steps, n_loops)
        last_only = (isinstance(self.step_weights, str) and self.step_weights == "last"
                     and self.consistency == 0 and model.exit_gate is None)
        out = loop_forward(model, idx, targets, n_loops=n_loops, grad_steps=grad_steps,
                           checkpoint=self.checkpoint, return_hidden=self.norm_penalty > 0,
                           readout="last" if last_only else "all")
        weights = "last" if last_only else self.step_weights
        loss = weighted_step_loss(out.step_losses, targets, weights)
        metrics = {"ce": loss.item(), "last_step_loss": out.loss.item(), "depth": n_loops}   # Trainer adds "loss"
        if self.norm_penalty > 0:
            penalty = hidden_norm_penalty(out.hidden)
            loss = loss + self.norm_penalty * penalty
            metrics["norm_penalty"] = penalty.item()
        if self.consistency > 0:
            agreement = step_consistency(out.logits, targets)
            loss = loss + self.consistency * agreement
            metrics["consistency"] = agreement.item()
        for handle in self._pending:        # hooks of a loss that was never backpropagated
            handle.remove()
        self._pending = []
        if self.scale_core_grad and loss.requires_grad:
            factor = 1.0 / (grad_steps or n_loops)
            self._pending = [_one_shot_scale(p, factor) for p in model.core.parameters() if p.requires_grad]
        return loss, metrics

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    def __repr__(self):
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in (
            "step_weights", "grad_steps", "checkpoint", "sample_depth", "sigma", "norm_penalty",
            "consistency", "scale_core_grad", "seed"))
        return f"LoopLoss({fields})"


def make_loop_loss(step_weights="last", grad_steps=None, checkpoint=False, sample_depth=None,
                   norm_penalty=0.0, consistency=0.0, **options):
    """A LoopLoss with these options (see LoopLoss); use as Trainer(loss_fn=make_loop_loss(...))."""
    return LoopLoss(step_weights=step_weights, grad_steps=grad_steps, checkpoint=checkpoint,
                    sample_depth=sample_depth, norm_penalty=norm_penalty, consistency=consistency,
                    **options)

# %% [markdown]
# One call with everything switched on, to see the metrics it reports:

# %% tags=["nbval-check-output"]
loss_fn = make_loop_loss(step_weights="linear", grad_steps=2, checkpoint=True, sample_depth=4,
                         norm_penalty=0.1, consistency=0.1, scale_core_grad=True, seed=0)
print(loss_fn)
loss, metrics = loss_fn(model, idx, targets)
print({name: round(value, 4) for name, value in metrics.items()})

# %% [markdown]
# The tests check the pieces against versions written out by hand: the loss against
# `weighted_step_loss` plus the two penalties, the penalties against loops over steps, the
# sampled depths against `sample_depth` with the same seed, and the gradient scaling against
# the unscaled gradient divided by the number of steps with gradient.

# %% tags=["nbval-check-output"]
#| test
def test_regularizers_match_loops_over_steps():
    torch.manual_seed(0)
    hidden = torch.randn(4, 2, 3, 8) * torch.tensor([1.0, 2.0, 2.0, 0.5]).view(4, 1, 1, 1)
    rms = [hidden[t].pow(2).mean(-1).sqrt() for t in range(4)]
    expected = sum((rms[t].log() - rms[t - 1].log()).pow(2).mean() for t in range(1, 4)) / 3
    torch.testing.assert_close(hidden_norm_penalty(hidden), expected)
    assert hidden_norm_penalty(hidden[:1]).item() == 0.0

    logits = torch.randn(3, 2, 4, 5, requires_grad=True)
    targets = torch.tensor([[1, 2, IGNORE_INDEX, 0], [IGNORE_INDEX, 4, 4, 1]])
    terms = []
    for t in range(2):
        for b, i in [(b, i) for b in range(2) for i in range(4) if targets[b, i] != IGNORE_INDEX]:
            p, q = logits[2, b, i].detach().softmax(-1), logits[t, b, i].softmax(-1)
            terms.append((p * (p.log() - q.log())).sum())
    torch.testing.assert_close(step_consistency(logits, targets), sum(terms) / len(terms))
    step_consistency(logits, targets).backward()
    assert logits.grad[2].abs().max() == 0            # the last step is the teacher: no gradient
    assert step_consistency(logits[:1], targets).item() == 0.0


def test_loop_loss_matches_its_parts():
    model = _full_model(3)
    idx, targets = _batch(3)
    loss_fn = make_loop_loss(step_weights="uniform", norm_penalty=0.5, consistency=0.25)
    loss, metrics = loss_fn(model, idx, targets)
    out = model(idx, targets=targets, return_hidden=True)
    expected = (weighted_step_loss(out.step_losses, targets, "uniform") + 0.5 * hidden_norm_penalty(out.hidden)
                + 0.25 * step_consistency(out.logits, targets))
    torch.testing.assert_close(loss, expected)
    assert metrics["depth"] == 3 and math.isclose(metrics["ce"], weighted_step_loss(
        out.step_losses, targets, "uniform").item(), rel_tol=1e-6)
    # the lean path (last readout only) gives the model's own loss
    torch.testing.assert_close(make_loop_loss()(model, idx, targets)[0], out.loss)
    # sampled depths follow sample_depth with the loss function's seed, and resume from state_dict
    sampled = make_loop_loss(sample_depth=3, seed=5)
    g = torch.Generator().manual_seed(5)
    assert [sampled.depth(model) for _ in range(20)] == [sample_depth(3, 0.5, g) for _ in range(20)]
    state = sampled.state_dict()
    ahead = [sampled.depth(model) for _ in range(5)]
    sampled.load_state_dict(state)
    assert [sampled.depth(model) for _ in range(5)] == ahead


def test_scale_core_grad_divides_the_core_gradient_once():
    model = _full_model(4)
    idx, targets = _batch(4)

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn(model, idx, targets)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(make_loop_loss(grad_steps=2))
    scaled = grads(make_loop_loss(grad_steps=2, scale_core_grad=True))
    for name in plain:
        factor = 0.5 if name.startswith("core.") else 1.0       # 2 steps with gradient
        torch.testing.assert_close(scaled[name], plain[name] * factor)
    assert grads(make_loop_loss(grad_steps=2)).keys() == plain.keys()
    for name, g in grads(make_loop_loss(grad_steps=2)).items():  # the hooks are gone
        torch.testing.assert_close(g, plain[name])


run_tests(test_regularizers_match_loops_over_steps, test_loop_loss_matches_its_parts,
          test_scale_core_grad_divides_the_core_gradient_once)

# %% [markdown]
# ## 4.8 Fixed against randomized depth: an experiment
#
# Does training at a random depth change what the loop does beyond the depth it was trained
# at? We train two copies of the same model on the stack data, with the same seed, the
# same batches and the same number of optimizer steps:
#
# - **fixed**: 4 steps for every batch;
# - **randomized**: a depth drawn per batch by `sample_depth` with $\bar r = 3$, so the
#   expected depth is also 4 steps, and the expected compute per batch is the same. Both runs
#   backpropagate through every step; we leave truncation out, so that the depth distribution
#   is the only difference.
#
# Then we read out the test accuracy (teacher-forced exact match of the whole answer, chapter
# 0's `answer_accuracy`) after every step from 1 to 16, four times the trained depth.

# %% [markdown]
# The batches come from chapter 3's `task_batches`, a `get_batch(generator)` that draws rows of
# the training set with the trainer's generator, and the scores from its `task_accuracy`,
# teacher-forced exact match of the whole answer for every step's readout.

# %%
get_batch = task_batches(splits.train, batch_size=32)

# %% [markdown]
# Both runs use chapter 3's `Trainer` with the loss functions of section 4.7, 600 optimizer
# steps each. One pair of runs is one seed, and the two curves of one seed can differ by
# chance as much as by design, so the experiment runs three seeds (the seed sets the initial
# weights, the order of the batches and the depth draws; the data are the same). That takes
# longer than this chapter should, so it is a stored experiment (Appendix B): the function
# below is the whole run for one seed, `python -m looplm.results run fixed-vs-random-depth`
# ran it for seeds 0, 1 and 2, and the chapter loads the numbers.

# %%
#| export experiments
import torch

from looplm.backprop import make_loop_loss
from looplm.data import TASK_VOCAB, make_splits, make_task
from looplm.model import LoopLM, LoopLMConfig
from looplm.results import Experiment, register
from looplm.train import TrainConfig, Trainer, task_accuracy, task_batches

CH04_SPLITS = dict(task="stack", n_train=5000, n_test=500, max_difficulty=4, ood_max_difficulty=5, seed=0)
CH04_STEPS, CH04_MAX_LOOPS = 600, 16


def _ch04_trainer(seed, randomized):
    splits = make_splits(**CH04_SPLITS)
    torch.manual_seed(seed)
    model = LoopLM(LoopLMConfig(TASK_VOCAB.vocab_size, 64, 4, n_loops=4, max_seq_len=16))
    loss_fn = make_loop_loss(sample_depth=3, seed=seed) if randomized else make_loop_loss()
    trainer = Trainer(model, task_batches(splits.train, batch_size=32),
                      TrainConfig(steps=CH04_STEPS, seed=seed, progress=False), loss_fn=loss_fn)
    return trainer, splits


def _ch04_run(seed):
    runs = {}
    for name, randomized in (("fixed depth 4", False), ("random depth, mean 4", True)):
        trainer, splits = _ch04_trainer(seed, randomized)
        trainer.run()
        depths = [int(row["depth"]) for row in trainer.history]
        runs[name] = {"curve": task_accuracy(trainer.model, splits.test, n_loops=CH04_MAX_LOOPS).tolist(),
                      "mean_depth": sum(depths) / len(depths), "max_depth": max(depths),
                      "shallow_share": sum(d <= 2 for d in depths) / len(depths),
                      "losses": [row["loss"] for row in trainer.history]}
    return {"runs": runs, "prefix": runs["fixed depth 4"]["losses"][:20]}


def _ch04_prefix(seed, n_steps):
    trainer, _ = _ch04_trainer(seed, randomized=False)
    trainer.run(until=n_steps)
    return [row["loss"] for row in trainer.history]


FIXED_VS_RANDOM_DEPTH = register(Experiment(
    "fixed-vs-random-depth", "04", "chapter 4: fixed against randomized training depth, accuracy at 1 to 16 steps",
    _ch04_run, _ch04_prefix))

# %% [markdown]
# The stored runs, each seed's mean and largest training depth, and the accuracy at 1 to 16
# steps (mean over the seeds):

# %% tags=["nbval-check-output"]
from looplm.results import load_results, per_seed, summary

stored = load_results("fixed-vs-random-depth")
print(stored["command"], "| seeds", stored["seeds"])
curves = {}
for name in ("fixed depth 4", "random depth, mean 4"):
    curves[name] = np.array(per_seed(stored, "runs", name, "curve"))           # (seeds, 16)
    depth = summary(per_seed(stored, "runs", name, "mean_depth"))
    largest = per_seed(stored, "runs", name, "max_depth")
    shallow = summary(per_seed(stored, "runs", name, "shallow_share"))
    print(f"{name:22s} mean depth {depth:.2f}, largest {largest}, batches of 1-2 steps {shallow:.2f}")
    print(f"{'':22s} accuracy at S=1..16: {' '.join(f'{a:.2f}' for a in curves[name].mean(0))}")
    print(f"{'':22s} per seed at S=4 and S=16: {curves[name][:, 3].round(2).tolist()} {curves[name][:, 15].round(2).tolist()}")

# %% [markdown]
# The live check of Appendix B: the first 20 training steps of seed 0, run again, give the stored
# losses.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
from looplm.results import check_prefix


def test_stored_depth_experiment_matches_a_live_prefix():
    difference, _ = check_prefix("fixed-vs-random-depth")
    assert difference <= 1e-3


run_tests(test_stored_depth_experiment_matches_a_live_prefix)

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.8))
steps = range(1, CH04_MAX_LOOPS + 1)
for name, runs in curves.items():
    line, = ax.plot(steps, runs.mean(0), marker="o", markersize=4, label=name)
    ax.fill_between(steps, runs.min(0), runs.max(0), color=line.get_color(), alpha=0.2)
ax.axvline(4, color="gray", linestyle="--", linewidth=1)
ax.text(4.2, 0.02, "trained depth (mean)", color="gray", fontsize=8)
ax.set(xlabel="loop steps at inference", ylabel="test exact match", ylim=(0, 1),
       title=f"Stack task, {CH04_STEPS} training steps, 3 seeds (band: lowest to highest)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# What the three seeds show, and no more:
#
# - The **fixed-depth** model answers almost every test problem at its trained depth (at least
#   0.99 at 4 steps in every seed, 0.95 at 3 and 0.97 at 5 on average) and gets worse the further it
#   runs past it: 0.53 at 10 steps and 0.27 at 16 on average, with a wide spread between the
#   seeds (the band). It learned to have the answer *at* step 4, not to keep it.
# - The **randomized-depth** model learned less in the same 600 steps: its best mean accuracy
#   is 0.54, at 5 steps. Past its mean depth its curve falls slowly, to 0.39 at 16 steps, and
#   at 16 steps it is ahead of the fixed-depth model in every seed, by 0.04 to 0.25.
#
# The randomized objective is harder: about 29% of its batches run one or two steps, where
# four-operation problems are out of reach, and the model must also cope with batches of 16
# or more steps. Whether it catches up with longer training, and whether it then keeps a flat
# curve at a higher level (what Huginn reports at scale), this experiment does not say.
# Chapter 5 takes up the same question from the other side: instead of making every depth
# work, it learns which depth to use.

# %% [markdown]
# ## 4.9 Checkpoints on disk
#
# A training run that can only finish in one sitting is fragile. The rest of the chapter adds
# to chapter 3's module `looplm/train.py`: saving a `Trainer` to a file, loading it back, and
# a command line around both. The cells below are exported there (`#| export train`), after
# chapter 3's code, which defines `Trainer`, `TrainConfig` and `default_loss`.

# %%
#| export train
import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path

import torch

from looplm import __version__
from looplm.backprop import STEP_WEIGHTS, make_loop_loss
from looplm.data import TASK_VOCAB, TASKS, make_splits, make_task
from looplm.model import INJECTIONS, LoopLM, LoopLMConfig

# %% [markdown]
# A checkpoint is one file holding a dictionary:
#
# | key | what |
# |---|---|
# | `format` | the string `"looplm-checkpoint"`, so that a stray file is recognised as not ours |
# | `looplm_version` | the version of the package that wrote it |
# | `model_config` | the model's `LoopLMConfig` as a plain dictionary, enough to rebuild the model |
# | `train_config` | the `TrainConfig`, the same way |
# | `trainer` | `trainer.state_dict()`: weights, optimizer state, step, batch generator, history |
# | `loss_fn` | the loss function's own state, if it has one (a `LoopLoss`'s depth generator) |
# | `extra` | anything the caller adds (the command line stores its arguments) |

# %% [markdown]
# Plain dictionaries, strings and tensors only: `torch.load(..., weights_only=True)` can read
# them without running any code stored in the file, so loading a checkpoint from elsewhere is
# safe.

# %% [markdown]
# **Writing atomically.** `torch.save` writes a file piece by piece. If the process dies half
# way (out of disk, a killed job, an exception while pickling), a plain `torch.save(path)`
# leaves a truncated file where the last good checkpoint used to be. So we write to a
# temporary file in the same folder, flush it to disk, and only then `os.replace` it onto the
# real name. `os.replace` within one file system is atomic: a reader sees the old file or the
# new one, never half of either. If anything fails, the temporary file is removed and the old
# checkpoint is untouched.

# %% [markdown]
# One failure no `except` clause can clean up after: a process killed outright (`kill -9`, a
# batch system's time limit, a power cut) leaves its temporary file behind, as large as the
# checkpoint it was about to become, and nothing would ever delete it. Its name is known,
# though: `.checkpoint.pt.<random>.tmp` next to `checkpoint.pt`. So every write first removes
# the temporary files an earlier write of *the same file* left behind. That is safe as long as
# one process at a time writes a given file, which holds for a training run and its folder. An
# `OSError` (a full disk, a folder that cannot be written) leaves things as they were and
# names the file it could not write.
#
# The same helper, `_atomic_write`, writes every file of a run: the checkpoint, and in
# section 4.10 the metrics and the plot.

# %%
#| export train
def _temporary_name_pattern(path):
    """The names of the temporary files of `path`: .NAME.<random>.tmp (random: hex here, or
    letters, digits and _ as tempfile.mkstemp, which earlier versions used)."""
    return re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]+\.tmp")


def _create_temporary(path):
    """A new empty file .NAME.<random hex>.tmp next to `path`, opened for writing -> (fd, its path).

    Created with os.open(..., 0o666), so its permissions follow the umask like any new file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:                 # 2**48 names: try another
            continue


def _remove_stale_temporaries(path):
    """Delete the temporary files that interrupted writes of `path` left in its folder. -> their names.

    Only one process at a time may write a given path: another writer's file would look stale.
    """
    path = Path(path)
    pattern = _temporary_name_pattern(path)
    try:
        names = sorted(os.listdir(path.parent))
    except OSError:                          # no folder yet, or one we cannot list: nothing to do
        return []
    removed = []
    for name in names:
        if pattern.fullmatch(name):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)
                removed.append(name)
    return removed


def _naming(path, error):
    """`error` (an OSError) as an OSError of the same kind that names `path`."""
    if error.errno is None:
        return error
    return OSError(error.errno, error.strerror or os.strerror(error.errno), str(path))


def _os_error_behind(error):
    """The OSError that caused `error`, or None. torch.save turns a failed write (a full disk)
    into a RuntimeError while it cleans up, with the OSError as its context."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _atomic_write(path, write):
    """Call write(f) with a binary file next to `path`, flush it to disk, os.replace it onto `path`.

    `path` ends up complete or unchanged. Leftovers of earlier interrupted writes of `path` are
    removed first; an OSError names `path`. -> path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, temporary = _create_temporary(path)
    except OSError as e:
        raise _naming(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        cause = _os_error_behind(e) if isinstance(e, Exception) else None
        if cause is not None:
            raise _naming(path, cause) from e
        raise
    return path

# %% [markdown]
# Saving itself builds the dictionary and hands it to `_atomic_write`:

# %%
#| export train
CHECKPOINT_FORMAT = "looplm-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not a looplm checkpoint, too new, broken, or for another model."""


def _config_dict(config):
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None


def save_checkpoint(path, trainer, extra=None):
    """Write trainer (model config, TrainConfig, state, loss_fn state) to `path`, atomically.

    The file appears complete or not at all: it is written to a temporary file in the same
    folder and moved onto `path` with os.replace; temporary files of `path` that killed writes
    left behind are deleted. Refuses (ValueError) a model holding non-finite weights. `extra`:
    plain data (dicts, lists, str, numbers, None). Returns the path.
    """
    path = Path(path)
    model = trainer.model
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"refusing to save a checkpoint: parameter {name} holds non-finite values")
    loss_fn = getattr(trainer, "loss_fn", None)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "looplm_version": __version__,
        "model_config": _config_dict(model.config),
        "train_config": _config_dict(getattr(trainer, "config", None)),
        "trainer": trainer.state_dict(),
        "loss_fn": loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else None,
        "extra": extra,
    }
    return _atomic_write(path, lambda f: torch.save(payload, f))

# %% [markdown]
# **Reading defensively.** Four things can be wrong with a file handed to `load_checkpoint`,
# and each gets its own message: it is not a looplm checkpoint at all (or it is truncated or
# corrupt); it was written by a newer version of the package, whose format this one may not
# understand; its weights hold NaN or infinite values; or it holds a model with another
# configuration than the one it is being loaded into.
#
# `save_checkpoint` never writes non-finite weights, but a file can come from elsewhere: an
# older tool, a hand-edited payload, a bit flipped on disk. A model loaded from such a file
# would produce NaN logits with no hint of why, so `read_checkpoint`, which every loader in the
# package goes through (`load_checkpoint` here, `load_model` in chapter 7), refuses it and
# names the tensor.

# %%
#| export train
def _version_tuple(version):
    return tuple(int(part) for part in re.findall(r"\d+", str(version))[:3])


def _check_stored_weights(path, payload):
    """CheckpointError unless payload["trainer"]["model"] is a dict whose tensors are all finite.

    (Entries that are not tensors are left to the loaders, which say what they expected.)
    """
    trainer = payload.get("trainer")
    weights = trainer.get("model") if isinstance(trainer, dict) else None
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} holds no model weights (no trainer['model'] dictionary)")
    for name, tensor in weights.items():
        if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex()):
            bad = (~torch.isfinite(tensor)).sum().item()
            if bad:
                raise CheckpointError(f"{path} is unusable: the stored model tensor {name} holds {bad} "
                                      f"non-finite value{'s' if bad > 1 else ''} (NaN or inf)")


def read_checkpoint(path, map_location="cpu"):
    """The checked contents of a checkpoint file (a dict; see save_checkpoint).

    CheckpointError if the file is not a readable looplm checkpoint, was written by a newer
    (or an unrecognisable) looplm version, or its model weights are missing or hold NaN or inf
    (the message names the tensor). FileNotFoundError if there is no file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle, zip and torch errors all mean "unreadable")
        reason = (str(e).splitlines() or [""])[0].split(". ")[0][:120]
        raise CheckpointError(f"{path} is not a readable looplm checkpoint: torch.load failed "
                              f"({type(e).__name__}: {reason})") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a looplm checkpoint (no format={CHECKPOINT_FORMAT!r} entry)")
    written_by = payload.get("looplm_version")
    if not isinstance(written_by, str) or len(_version_tuple(written_by)) != 3:
        raise CheckpointError(f"{path} was written by an unknown looplm version {written_by!r}")
    if _version_tuple(written_by) > _version_tuple(__version__):
        raise CheckpointError(f"{path} was written by looplm {written_by}, newer than the installed "
                              f"looplm {__version__}; upgrade looplm to load it")
    _check_stored_weights(path, payload)
    return payload


def _config_differences(expected, found):
    a, b = dataclasses.asdict(expected), dataclasses.asdict(found)
    return [f"{key}: checkpoint {a[key]!r}, model {b.get(key)!r}" for key in a if a[key] != b.get(key)]


def checkpoint_model(path, payload, model=None):
    """The LoopLM for a checkpoint's payload (from read_checkpoint): built from the stored config,
    or `model` after checking that its config is the stored one. Weights are not loaded."""
    try:
        stored = LoopLMConfig(**payload["model_config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} holds a model config this looplm cannot build: {e}") from e
    if model is None:
        return LoopLM(stored)
    if not isinstance(model, LoopLM):
        raise TypeError(f"model must be a LoopLM, got {type(model).__name__}")
    if model.config != stored:
        raise CheckpointError(f"{path} holds a model with another config than the model given: "
                              + "; ".join(_config_differences(stored, model.config)))
    return model

# %% [markdown]
# `load_checkpoint` rebuilds the model from the stored config, or checks the config of a
# model passed in, then builds a `Trainer` around it and restores its state. The `TrainConfig`
# defaults to the stored one; pass another to change, say, the number of steps of a resumed
# run (the learning-rate schedule follows the new value). A caller that has read the file
# already (the command line below does, to check its flags) passes what `read_checkpoint`
# returned as `payload`, and the file is not read twice.

# %%
#| export train
def load_checkpoint(path, get_batch, config=None, *, model=None, loss_fn=None, evaluate=None,
                    map_location="cpu", payload=None):
    """A Trainer restored from a checkpoint written by save_checkpoint.

    The model is rebuilt from the stored LoopLMConfig, or `model` is used after checking that its
    config equals the stored one (CheckpointError listing the differences otherwise). config: a
    TrainConfig (default: the stored one). loss_fn (default default_loss) gets its state back if
    it has load_state_dict and the checkpoint holds one. payload: read_checkpoint(path)'s result,
    if the caller has it already (the file is then not read again).
    """
    if payload is None:
        payload = read_checkpoint(path, map_location)
    model = checkpoint_model(path, payload, model)
    if config is None:
        if payload.get("train_config") is None:
            raise CheckpointError(f"{path} stores no TrainConfig; pass config=TrainConfig(...)")
        config = TrainConfig(**payload["train_config"])
    loss_fn = default_loss if loss_fn is None else loss_fn
    trainer = Trainer(model, get_batch, config, loss_fn=loss_fn, evaluate=evaluate)
    trainer.load_state_dict(payload["trainer"])
    if payload.get("loss_fn") is not None and hasattr(loss_fn, "load_state_dict"):
        loss_fn.load_state_dict(payload["loss_fn"])
    return trainer

# %% [markdown]
# The promise to check: stopping at step 10, saving, loading into a fresh process's worth of
# objects and running 10 more steps gives the *same* losses as 20 steps in one go. Everything
# that influences step 11 must be in the file: weights, Adam's moments, the step counter (for
# the learning-rate schedule), the batch generator, and the depth generator of a randomized
# depth loss. We use the randomized-depth loss to check the last one too.

# %% tags=["nbval-check-output"]
def fresh_trainer(steps=20):
    _ = torch.manual_seed(0)
    return Trainer(LoopLM(config), get_batch, TrainConfig(steps=steps, warmup_steps=5, seed=0, progress=False),
                   loss_fn=make_loop_loss(sample_depth=3, seed=1))


def losses(history):
    return [record["loss"] for record in history]


uninterrupted = fresh_trainer()
uninterrupted.run()
with tempfile.TemporaryDirectory() as folder:
    first_half = fresh_trainer()
    first_half.run(until=10)
    save_checkpoint(Path(folder) / "checkpoint.pt", first_half)
    del first_half                                            # nothing survives but the file
    resumed = load_checkpoint(Path(folder) / "checkpoint.pt", get_batch,
                              loss_fn=make_loop_loss(sample_depth=3, seed=1))
    print("resumed at step", resumed.step, "| files in the folder:", sorted(os.listdir(folder)))
    resumed.run()
print("identical losses over 20 steps:", losses(resumed.history) == losses(uninterrupted.history))
print("depths drawn:", [int(record["depth"]) for record in resumed.history])

# %% [markdown]
# The loss function passed to `load_checkpoint` was made with the same seed as the original;
# its generator state is then overwritten by the stored one, so the depths after step 10
# continue the original sequence rather than restarting it.

# %% [markdown]
# **A non-finite loss never reaches the disk.** Chapter 3's `Trainer` raises
# `FloatingPointError` when a loss or gradient is not finite, before the optimizer step. A
# caller that saves after each stretch of training (as the command line below does) never
# saves the broken state, and the last good checkpoint stays as it was. To see it, we poison
# the loss function at step 15 of a run that saved at step 10:

# %% tags=["nbval-check-output"]
class PoisonedLoss:
    """Wraps a loss function; returns NaN from call number `at` on."""

    def __init__(self, loss_fn, at):
        self.loss_fn, self.at, self.calls = loss_fn, at, 0

    def __call__(self, model, idx, targets):
        self.calls += 1
        loss, metrics = self.loss_fn(model, idx, targets)
        return (loss * float("nan") if self.calls >= self.at else loss), metrics


with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "checkpoint.pt"
    trainer = Trainer(LoopLM(config), get_batch, TrainConfig(steps=20, warmup_steps=5, progress=False),
                      loss_fn=PoisonedLoss(default_loss, at=15))
    try:
        for until in (10, 20):
            trainer.run(until=until)
            save_checkpoint(path, trainer)
    except FloatingPointError as e:
        print("FloatingPointError:", e)
    print("files:", sorted(os.listdir(folder)), "| checkpoint at step", read_checkpoint(path)["trainer"]["step"])

# %% [markdown]
# The tests: the round trip, the atomic write (an exception while writing leaves the old file
# intact and no temporary file behind), and the three kinds of unusable file.

# %% tags=["nbval-check-output"]
#| test
import os
import tempfile
from pathlib import Path

import looplm
from looplm.train import TrainConfig, Trainer


def _tiny_get_batch(generator):
    idx = torch.randint(0, 13, (4, 8), generator=generator)
    return idx, idx.roll(-1, dims=1)


def _tiny_trainer(steps=6, loss_fn=None):
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=13, d_model=16, n_heads=2, n_loops=2, max_seq_len=8))
    kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
    config = TrainConfig(steps=steps, batch_size=4, warmup_steps=2, progress=False)
    return Trainer(model, _tiny_get_batch, config, **kwargs)


def test_checkpoint_round_trip_continues_exactly():
    whole = _tiny_trainer(loss_fn=make_loop_loss(sample_depth=2, seed=3))
    whole.run()
    with tempfile.TemporaryDirectory() as folder:
        half = _tiny_trainer(loss_fn=make_loop_loss(sample_depth=2, seed=3))
        half.run(until=3)
        path = save_checkpoint(Path(folder) / "run" / "checkpoint.pt", half, extra={"note": "half"})
        assert sorted(os.listdir(path.parent)) == ["checkpoint.pt"]           # no temporary file left
        payload = read_checkpoint(path)
        assert payload["looplm_version"] == looplm.__version__ and payload["extra"] == {"note": "half"}
        resumed = load_checkpoint(path, _tiny_get_batch, loss_fn=make_loop_loss(sample_depth=2, seed=3))
        assert resumed.step == 3 and resumed.model.config == half.model.config
        resumed.run()
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)


def test_failed_write_leaves_the_old_checkpoint_intact():
    trainer = _tiny_trainer()
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(Path(folder) / "checkpoint.pt", trainer)
        before = path.read_bytes()
        trainer.run(until=2)
        with pytest.raises(Exception):
            save_checkpoint(path, trainer, extra={"unpicklable": lambda: None})   # fails while writing
        assert path.read_bytes() == before
        assert os.listdir(folder) == ["checkpoint.pt"]
        with torch.no_grad():
            next(trainer.model.parameters())[0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            save_checkpoint(path, trainer)
        assert path.read_bytes() == before


def test_unusable_checkpoints_get_clear_errors():
    trainer = _tiny_trainer()
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(Path(folder) / "checkpoint.pt", trainer)
        other = LoopLM(LoopLMConfig(vocab_size=13, d_model=32, n_heads=2, n_loops=2, max_seq_len=8))
        with pytest.raises(CheckpointError, match="d_model: checkpoint 16, model 32"):
            load_checkpoint(path, _tiny_get_batch, model=other)
        newer = Path(folder) / "newer.pt"
        payload = torch.load(path, weights_only=True)
        payload["looplm_version"] = "99.0.0"
        torch.save(payload, newer)
        with pytest.raises(CheckpointError, match="written by looplm 99.0.0, newer than the installed"):
            load_checkpoint(newer, _tiny_get_batch)
        garbage = Path(folder) / "garbage.pt"
        garbage.write_bytes(b"not a checkpoint at all")
        with pytest.raises(CheckpointError, match="is not a readable looplm checkpoint"):
            read_checkpoint(garbage)
        truncated = Path(folder) / "truncated.pt"
        truncated.write_bytes(path.read_bytes()[:200])
        with pytest.raises(CheckpointError, match="is not a readable looplm checkpoint"):
            read_checkpoint(truncated)
        foreign = Path(folder) / "foreign.pt"
        torch.save({"model": {}}, foreign)
        with pytest.raises(CheckpointError, match="is not a looplm checkpoint"):
            read_checkpoint(foreign)
        with pytest.raises(FileNotFoundError):
            read_checkpoint(Path(folder) / "missing.pt")


run_tests(test_checkpoint_round_trip_continues_exactly, test_failed_write_leaves_the_old_checkpoint_intact,
          test_unusable_checkpoints_get_clear_errors)

# %% [markdown]
# Two more tests, kept in the notebook and the test suite but not shown here, check what this
# section added: a checkpoint whose weights hold NaN or inf is refused, naming the tensor; and
# a save removes the temporary files that killed saves of the same file left behind, and
# nothing else.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def test_checkpoints_with_non_finite_weights_are_refused():
    trainer = _tiny_trainer()
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(Path(folder) / "checkpoint.pt", trainer)
        payload = torch.load(path, weights_only=True)
        broken = Path(folder) / "broken.pt"
        for bad in (float("nan"), float("inf"), -float("inf")):
            weights = {name: tensor.clone() for name, tensor in payload["trainer"]["model"].items()}
            weights["core.0.mlp.up.weight"][1, 2] = bad
            torch.save({**payload, "trainer": {**payload["trainer"], "model": weights}}, broken)
            message = r"the stored model tensor core\.0\.mlp\.up\.weight holds 1 non-finite value \(NaN or inf\)"
            with pytest.raises(CheckpointError, match=message):
                read_checkpoint(broken)                         # what every loader calls first
            with pytest.raises(CheckpointError, match=message):
                load_checkpoint(broken, _tiny_get_batch)
        torch.save({**payload, "trainer": {"step": 3}}, broken)
        with pytest.raises(CheckpointError, match="holds no model weights"):
            read_checkpoint(broken)


def test_a_save_removes_the_temporary_files_of_killed_saves():
    trainer = _tiny_trainer()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        stale = [".checkpoint.pt.k3j_2h1g.tmp", ".checkpoint.pt.0badc0ffee00.tmp"]     # mkstemp's names, ours
        others = [".checkpoint.pt.bak.k3j2h1g0.tmp", ".metrics.jsonl.k3j2h1g0.tmp", "notes.tmp", "checkpoint.pt.tmp"]
        for name in stale + others:
            (folder / name).write_bytes(bytes(4096))
        save_checkpoint(folder / "checkpoint.pt", trainer)
        assert sorted(os.listdir(folder)) == sorted(["checkpoint.pt", *others])


run_tests(test_checkpoints_with_non_finite_weights_are_refused, test_a_save_removes_the_temporary_files_of_killed_saves)

# %% [markdown]
# ## 4.10 Training from the command line
#
# Everything so far runs inside a notebook. A longer run belongs in a terminal (or a batch
# job), where it can be left alone, interrupted and resumed:
#
# ```
# python -m looplm.train --task addition --n-loops 4 --steps 2000 --out runs/addition
# python -m looplm.train --task addition --n-loops 4 --steps 4000 --out runs/addition --resume
# ```
#
# The command trains on one of chapter 0's tasks, prints the loss and the test accuracy at
# regular intervals, and after each interval saves `DIR/checkpoint.pt` and `DIR/metrics.jsonl`
# (atomically, so an interrupted run can always resume from the last one). `metrics.jsonl`
# holds one JSON object per optimizer step, the trainer's history row: `step`, `loss`, `lr`,
# `grad_norm`, the loss function's metrics, and `eval_test_acc` on the steps that evaluated.
# At the end the command plots the loss curve into `DIR/loss.png`.

# %% [markdown]
# First the data: training and test examples of difficulty $1, \dots, N$ from `make_splits`.
# Chapter 3's `task_batches` turns the training examples into a `get_batch`, and its
# `task_accuracy` scores the test examples.

# %%
#| export train
def _task_splits(args):
    """The command line's TaskSplits: difficulties 1..N for training and testing."""
    options = {"reverse_answer": True} if args.reverse_answer else {}
    if args.reverse_answer and args.task != "addition":
        raise ValueError(f"--reverse-answer applies to the addition task only, not {args.task!r}")
    return make_splits(make_task(args.task, **options), n_train=args.n_train, n_test=args.n_test,
                       max_difficulty=args.difficulty, ood_max_difficulty=args.difficulty + 1,
                       seed=args.seed)

# %% [markdown]
# The arguments. The model's shape and the training settings have flags shared by every
# *recipe*, a way of training registered by name in `RECIPES`. This chapter registers the
# `"standard"` recipe, one loss for the whole run built from section 4.7's options; chapter 5
# adds a second. A recipe is a help line, a function that adds its own flags, and a function
# `run(args, model, get_batch, config, evaluate)` that trains and returns its `Trainer`.
# `--help` lists everything, grouped.

# %% [markdown]
# **What `--resume` may change.** A resumed run must be the run it continues, so the command
# stores every flag's value in the checkpoint (a plain dictionary, under `extra["flags"]`) and
# `--resume` compares them. Four flags may differ, because none of them changes what the
# updates compute:
#
# - `--steps`, to train longer: the cosine schedule stretches to the new end (and so do the
#   default warmup and evaluation interval, which follow `--steps`);
# - `--eval-every`: when to evaluate and save, not what to train;
# - `--device`: the same updates on other hardware (bit for bit only on the same device);
# - `--no-progress`: the progress bar.
#
# Any other difference is refused with an error naming the flag and both values. A different
# `--task`, `--difficulty`, `--reverse-answer`, `--n-train`, `--n-test` or `--seed` would
# continue training on other data; a different `--lr`, `--batch-size`, `--warmup-steps`,
# recipe or loss flag would continue with another recipe; either way the result is a model
# trained on a mixture that no flag of either run records. The model flags are compared too
# (and the model config in the checkpoint once more, when it is loaded). Only the flags of
# other recipes than the run's are left out: they are unused, and at their defaults anyway.

# %%
#| export train
from collections.abc import Callable
from dataclasses import dataclass

RESUME_MAY_CHANGE = ("steps", "eval_every", "device", "no_progress")   # flags --resume may change


def _flag(dest):
    return "--" + dest.replace("_", "-")


@dataclass
class Recipe:
    """A way to train from the command line: `python -m looplm.train --recipe NAME`.

    add_arguments(parser) adds the recipe's own flags (in an argument group);
    run(args, model, get_batch, config, evaluate) trains and returns the Trainer whose model
    and history main() saves. resumable: whether --resume can continue one of its runs (then
    args.resume_from holds read_checkpoint's result for OUT/checkpoint.pt, flags checked).
    A recipe that saves during training calls _save_run(args, trainer).
    """

    help: str
    add_arguments: Callable
    run: Callable
    resumable: bool = False


RECIPES = {}


def _parser():
    """The parser, with every registered recipe's flags; -> (parser, {recipe: its flag dests})."""
    p = argparse.ArgumentParser(
        prog="python -m looplm.train", description="Train a looped LM on one of chapter 0's tasks.",
        epilog="--resume continues the run in --out with the flags it was started with: only "
               + ", ".join(_flag(dest) for dest in RESUME_MAY_CHANGE) + " may differ; any other "
               "difference is an error. Files written: OUT/checkpoint.pt and OUT/metrics.jsonl (one "
               "JSON object per step) after every evaluation, OUT/loss.png at the end.")
    data = p.add_argument_group("data")
    data.add_argument("--task", default="addition", choices=sorted(TASKS))
    data.add_argument("--difficulty", type=int, default=2, help="train and test on difficulties 1..N (default 2)")
    data.add_argument("--reverse-answer", action="store_true", help="addition: answer least significant digit first")
    data.add_argument("--n-train", type=int, default=20000, help="training examples (default 20000)")
    data.add_argument("--n-test", type=int, default=500, help="test examples (default 500)")
    model = p.add_argument_group("model")
    model.add_argument("--n-loops", type=int, default=4, help="loop steps S (default 4)")
    model.add_argument("--d-model", type=int, default=64)
    model.add_argument("--n-heads", type=int, default=4)
    model.add_argument("--n-core", type=int, default=1, help="blocks in the looped core (default 1)")
    model.add_argument("--injection", default="none", choices=sorted(INJECTIONS))
    model.add_argument("--norm-style", default="pre", choices=["pre", "sandwich", "huginn"])
    train = p.add_argument_group("training")
    train.add_argument("--recipe", default="standard", choices=sorted(RECIPES),
                       help="; ".join(f"{name}: {r.help}" for name, r in sorted(RECIPES.items())))
    train.add_argument("--steps", type=int, default=2000, help="optimizer steps in total (default 2000)")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    train.add_argument("--warmup-steps", type=int, default=None, help="default: min(50, steps // 10)")
    train.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default steps/10)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="runs/run",
                     help="folder for checkpoint.pt, metrics.jsonl and loss.png (default runs/run)")
    out.add_argument("--resume", action="store_true",
                     help="continue from OUT/checkpoint.pt, with the same flags except "
                          + ", ".join(_flag(dest) for dest in RESUME_MAY_CHANGE))
    out.add_argument("--no-progress", action="store_true", help="no progress bar (also off when TQDM_DISABLE or CI is set)")
    owned = {}
    for name, recipe in sorted(RECIPES.items()):
        before = {a.dest for a in p._actions}
        recipe.add_arguments(p)
        owned[name] = {a.dest for a in p._actions} - before
    return p, owned


def _reject_foreign_flags(parser, args, owned):
    """A flag of another recipe than the chosen one would be ignored: an error instead."""
    for name, dests in owned.items():
        if name == args.recipe:
            continue
        for dest in sorted(dests):
            if getattr(args, dest) != parser.get_default(dest):
                parser.error(f"{_flag(dest)} belongs to the {name!r} recipe, not {args.recipe!r}")


def _run_flags(parser, args):
    """Every flag's value by its dest, as plain data (str, int, float, bool or None)."""
    return {a.dest: getattr(args, a.dest) for a in parser._actions if a.dest != "help"}


def _shown(value):
    if value is None or value is False:
        return "not set"
    return "set" if value is True else repr(value)


def _check_resumed_flags(parser, args, payload, path, other_recipes=()):
    """ValueError naming each flag whose value differs from the run stored at `path`
    (except RESUME_MAY_CHANGE, and the flags of `other_recipes`, which are at their defaults
    and unused), and if --steps is below the step the run has reached."""
    extra = payload.get("extra")
    stored = extra.get("flags") if isinstance(extra, dict) else None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path} does not record the flags of the run that wrote it (it was not "
                              f"written by python -m looplm.train), so --resume cannot check that it "
                              f"continues the same run; start a new run with another --out")
    differences = []
    for dest, value in args.flags.items():
        if dest in RESUME_MAY_CHANGE or dest in ("out", "resume") or dest in other_recipes:
            continue
        before = stored.get(dest, parser.get_default(dest))      # a flag newer than the run: its default
        if before != value:
            differences.append(f"{_flag(dest)} is {_shown(before)} in the run being resumed, {_shown(value)} here")
    if differences:
        allowed = ", ".join(_flag(dest) for dest in RESUME_MAY_CHANGE)
        raise ValueError("; ".join(differences) + f" (only {allowed} may change on --resume)")
    reached = payload["trainer"].get("step")
    if isinstance(reached, int) and args.steps < reached:
        raise ValueError(f"--steps {args.steps}: the run being resumed is already at step {reached}; "
                         f"pass --steps {reached} or more")

# %% [markdown]
# The standard recipe's flags are the loss options of section 4.7. Its `run` trains in
# stretches of `--eval-every` steps; after each it prints one line and saves the checkpoint
# and the metrics (`_save_run`, below), so an interrupted run loses at most one stretch and
# `--resume` continues it. (The trainer evaluates at the end of each stretch, because
# stretches end at multiples of `eval_every`.) The last stretch is saved by `main`, which
# saves the final state of every recipe.

# %%
#| export train
def _standard_arguments(parser):
    loss = parser.add_argument_group("standard recipe: the loss (section 4.7)")
    loss.add_argument("--step-weights", default="last", choices=STEP_WEIGHTS)
    loss.add_argument("--grad-steps", type=int, default=None, help="backpropagate through the last k steps only")
    loss.add_argument("--mean-depth", type=float, default=None, help="randomized depth: Huginn's sampler with this r̄")
    loss.add_argument("--checkpointing", action="store_true", help="activation checkpointing per loop step")
    loss.add_argument("--norm-penalty", type=float, default=0.0)
    loss.add_argument("--consistency", type=float, default=0.0)


def _print_progress(trainer, start, steps):
    recent = [r for r in trainer.history if r["step"] > start]
    line = f"step {trainer.step:>6d}/{steps}  loss {sum(r['loss'] for r in recent) / len(recent):.4f}"
    if "eval_test_acc" in recent[-1]:
        line += f"  test accuracy {recent[-1]['eval_test_acc']:.3f}"
    print(line, flush=True)


def _standard_run(args, model, get_batch, config, evaluate):
    loss_fn = make_loop_loss(step_weights=args.step_weights, grad_steps=args.grad_steps,
                             checkpoint=args.checkpointing, sample_depth=args.mean_depth,
                             norm_penalty=args.norm_penalty, consistency=args.consistency,
                             seed=args.seed)
    checkpoint_path = Path(args.out) / "checkpoint.pt"
    if args.resume:
        trainer = load_checkpoint(checkpoint_path, get_batch, config, model=model, loss_fn=loss_fn,
                                  evaluate=evaluate, payload=args.resume_from)
        args.resume_from = None                         # the trainer holds the state now
        print(f"resumed from {checkpoint_path} at step {trainer.step}", flush=True)
    else:
        trainer = Trainer(model, get_batch, config, loss_fn=loss_fn, evaluate=evaluate)
    while trainer.step < config.steps:
        start = trainer.step
        trainer.run(until=min(config.steps, (start // config.eval_every + 1) * config.eval_every))
        _print_progress(trainer, start, config.steps)
        if trainer.step < config.steps:                 # main saves the final state
            _save_run(args, trainer)
    return trainer


RECIPES["standard"] = Recipe(help="one loss for the whole run, from section 4.7's options",
                             add_arguments=_standard_arguments, run=_standard_run, resumable=True)

# %% [markdown]
# What a run writes, each file through `_atomic_write`:
#
# - `checkpoint.pt` first, then `metrics.jsonl`, so the metrics never hold a step the
#   checkpoint does not. The metrics file is the trainer's history, rewritten whole at every
#   save (a few hundred kilobytes for thousands of steps). A resumed run starts from the
#   history stored in the checkpoint, so its file is the one an uninterrupted run would have
#   written. JSON has no NaN or infinity (Python's `json` writes them, but other readers
#   reject the file), so a non-finite value is written as `null`, and `allow_nan=False` makes
#   sure no other one slips through.
# - `loss.png`, the loss plot, drawn with matplotlib's object interface (`Figure`), which needs
#   no display and leaves the global `pyplot` state alone. It takes the test accuracy from the
#   history rows that hold an evaluation.

# %%
#| export train
def _json_value(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_metrics(path, history):
    """Write `history` (a Trainer's rows) to `path` as JSON lines, one object per row, atomically.

    Non-finite numbers are written as null: the file is valid JSON throughout. -> path.
    """
    lines = [json.dumps({key: _json_value(value) for key, value in row.items()}, allow_nan=False) + "\n"
             for row in history]
    return _atomic_write(path, lambda f: f.write("".join(lines).encode("utf-8")))


def _save_run(args, trainer):
    """OUT/checkpoint.pt (with the run's flags), then OUT/metrics.jsonl."""
    out = Path(args.out)
    save_checkpoint(out / "checkpoint.pt", trainer, extra={"argv": args.argv, "flags": args.flags})
    write_metrics(out / "metrics.jsonl", trainer.history)


def _plot_history(history, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    ax.plot([r.get("step", i + 1) for i, r in enumerate(history)], [r["loss"] for r in history],
            linewidth=0.8, label="training loss")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="python -m looplm.train")
    evaluations = [(r["step"], r["eval_test_acc"]) for r in history if "eval_test_acc" in r]
    if evaluations:
        twin = ax.twinx()
        twin.plot(*zip(*evaluations), "o-", color="C1", label="test accuracy")
        twin.set(ylabel="test exact match", ylim=(0, 1))
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))

# %% [markdown]
# And `main`. Model and training configs come from the flags; with `--resume` the flags must
# be the stored run's (see above: the flags describe the run you think you are resuming, and a
# mismatch is an error, not a silent switch). Without `--resume`, an existing checkpoint is
# never overwritten.
#
# The exit status says what happened, and every failure is one line on stderr, never a
# traceback:
#
# | status | when |
# |---|---|
# | 0 | the run finished and its files are written |
# | 2, `error: …` | bad input, found before training: a bad flag, a resume that does not match, an `--out` that is a file or cannot be written to, a model too large for this machine's memory |
# | 1, `stopped: …` | the run failed on the way: a non-finite loss, a full disk, memory running out; the files in `--out` are those of the last complete save |
#
# `--out` is checked before any training by creating the folder and a file in it: a
# read-only folder is better found now than after the first hour of training. Running out of
# memory shows up in PyTorch as a `RuntimeError` whose message says so (`torch.OutOfMemoryError`
# on a GPU), which `_out_of_memory` recognises; any other `RuntimeError` is a bug and keeps its
# traceback.

# %%
#| export train
def _out_of_memory(error):
    """Whether `error` says that an allocation failed (CPU or GPU)."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("out of memory", "can't allocate memory", "not enough memory"))


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _build_model(model_config, args):
    """LoopLM(model_config), or a ValueError naming the flags if it does not fit in memory."""
    try:
        return LoopLM(model_config)
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise
        raise ValueError(f"the model of --d-model {args.d_model} and --n-core {args.n_core} does not fit in "
                         f"this machine's memory ({_first_line(e)}); use a smaller --d-model or --n-core") from e


def _prepare_out(out):
    """Create the --out folder, check that a file can be written in it (ValueError naming it if
    not), and delete what interrupted writes of the run's files left behind."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = _create_temporary(out / "write-check")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out {out} is not a folder this process can write to "
                         f"({e.strerror or _first_line(e)})") from e
    for name in ("checkpoint.pt", "metrics.jsonl", "loss.png"):
        _remove_stale_temporaries(out / name)


def main(argv=None):
    """The command line: python -m looplm.train --help. Returns an exit status."""
    parser, owned = _parser()
    args = parser.parse_args(argv)
    _reject_foreign_flags(parser, args, owned)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.flags = _run_flags(parser, args)
    args.resume_from = None
    recipe = RECIPES[args.recipe]
    out = Path(args.out)
    checkpoint_path = out / "checkpoint.pt"
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        if args.resume and not recipe.resumable:
            raise ValueError(f"the {args.recipe!r} recipe cannot resume a run; start a new one")
        if args.resume and not checkpoint_path.exists():
            raise ValueError(f"--resume: there is no {checkpoint_path} to continue")
        if checkpoint_path.exists() and not args.resume:
            raise ValueError(f"{checkpoint_path} exists: pass --resume to continue that run, "
                             f"or choose another --out")
        if args.resume:
            args.resume_from = read_checkpoint(checkpoint_path)
            unused = {dest for name, dests in owned.items() if name != args.recipe for dest in dests}
            _check_resumed_flags(parser, args, args.resume_from, checkpoint_path, unused)
        splits = _task_splits(args)
        seq_len = max(len(e.prompt) + len(e.answer) for e in splits.train + splits.test)
        model_config = LoopLMConfig(
            vocab_size=TASK_VOCAB.vocab_size, d_model=args.d_model, n_heads=args.n_heads,
            n_core=args.n_core, n_loops=args.n_loops, injection=args.injection,
            norm_style=args.norm_style, max_seq_len=seq_len)
        if args.eval_every is not None and args.eval_every < 1:
            raise ValueError(f"--eval-every must be >= 1, got {args.eval_every}")
        warmup = min(50, args.steps // 10) if args.warmup_steps is None else args.warmup_steps
        train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   min_lr=args.lr / 10, warmup_steps=warmup,
                                   eval_every=args.eval_every or max(1, args.steps // 10),
                                   seed=args.seed, device=args.device, progress=not args.no_progress)
        get_batch = task_batches(splits.train, args.batch_size, seq_len)
        evaluate = evaluate_tasks({"test": splits.test})
        torch.manual_seed(args.seed)
        model = _build_model(model_config, args)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"task {args.task} (difficulty 1..{args.difficulty}): {len(splits.train)} train, "
              f"{len(splits.test)} test examples; model {n_params:,} parameters, {args.n_loops} loops, "
              f"recipe {args.recipe}", flush=True)
        _prepare_out(out)
        trainer = recipe.run(args, model, get_batch, train_config, evaluate)
        _save_run(args, trainer)
        if trainer.history:
            _plot_history(trainer.history, out / "loss.png")
    except (ValueError, TypeError) as e:
        print(f"python -m looplm.train: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"python -m looplm.train: stopped: {e}; the last checkpoint is unchanged", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"python -m looplm.train: stopped: could not write {e.filename or out}: "
              f"{e.strerror or _first_line(e)}; the files in {out} are those of the last complete save",
              file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise
        print(f"python -m looplm.train: stopped: out of memory while training ({_first_line(e)}); try a "
              f"smaller --batch-size, --d-model or --n-loops; the last checkpoint is unchanged", file=sys.stderr)
        return 1
    print(f"wrote {checkpoint_path}, {out / 'metrics.jsonl'} and {out / 'loss.png'}", flush=True)
    return 0

# %%
#| export train
if __name__ == "__main__" and "get_ipython" not in globals() and globals().get("__spec__") is not None:
    # `python -m looplm.train` (not a notebook, not the chapter run as a script). The export
    # places this cell last in looplm/train.py, after the recipes later chapters register.
    sys.exit(main())

# %% [markdown]
# The chapter runs the command in a subprocess, as you would in a terminal: a short run of 30
# steps on a small model, into a temporary folder. Thirty steps are far too few to learn
# addition, and the test accuracy stays at 0: the run is here to show the mechanics (a real
# run uses the default 2,000 steps). Under `TQDM_DISABLE=1` the trainer's progress bar stays
# off; in a terminal it shows on stderr.

# %%
run_folder = Path(tempfile.mkdtemp(prefix="looplm-train-"))
command = [sys.executable, "-m", "looplm.train", "--task", "addition", "--reverse-answer", "--n-loops", "4",
           "--steps", "30", "--eval-every", "10", "--d-model", "32", "--n-heads", "2", "--batch-size", "16",
           "--n-train", "2000", "--n-test", "200", "--out", str(run_folder)]
result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
print(result.stdout.replace(str(run_folder), "DIR"), result.stderr[-2000:], "exit status", result.returncode)

# %%
display(Image(filename=run_folder / "loss.png"))

# %% [markdown]
# The folder holds the three files, and `metrics.jsonl` one line per step. Step 10's line is
# the first with an evaluation:

# %%
print(sorted(os.listdir(run_folder)))
print((run_folder / "metrics.jsonl").read_text().splitlines()[9])

# %% [markdown]
# The same command again without `--resume` refuses to overwrite the run; with `--resume` and a
# larger `--steps` it continues from step 30; and a resume with another `--n-train` is refused,
# since it would continue on other data. This time we call the module's `main` directly, in
# this process, which saves starting a second interpreter:

# %%
from looplm.train import main as train_main

flags = command[command.index("--task"):] + ["--no-progress"]
for extra in ([], ["--steps", "40", "--resume"], ["--steps", "50", "--resume", "--n-train", "3000"]):
    captured_out, captured_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(captured_out), contextlib.redirect_stderr(captured_err):
        status = train_main(flags + extra)
    print((captured_out.getvalue() + captured_err.getvalue()).replace(str(run_folder), "DIR"), "exit status", status)

# %% [markdown]
# The test runs the command for a few steps in a temporary folder and checks its files, then
# resumes it (in-process, calling `main` directly, which is faster than a second interpreter),
# and checks that flags describing another model are refused:

# %% tags=["nbval-check-output"]
#| test
import contextlib
import io
import subprocess
import sys

from looplm.train import main


def _quiet_main(argv):
    """main(argv) with its output captured (it names temporary folders)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


def test_command_line_trains_saves_and_resumes():
    with tempfile.TemporaryDirectory() as folder:
        args = ["--task", "stack", "--difficulty", "3", "--n-loops", "2", "--d-model", "16", "--n-heads", "2",
                "--batch-size", "8", "--n-train", "200", "--n-test", "50", "--eval-every", "2", "--out", folder]
        result = subprocess.run([sys.executable, "-m", "looplm.train", *args, "--steps", "4"],
                                capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"},
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert "step      4/4" in result.stdout and "test accuracy" in result.stdout
        assert sorted(os.listdir(folder)) == ["checkpoint.pt", "loss.png", "metrics.jsonl"]
        assert read_checkpoint(Path(folder) / "checkpoint.pt")["trainer"]["step"] == 4
        assert _quiet_main([*args, "--steps", "4"]) == 2                    # refuses to overwrite
        assert _quiet_main([*args, "--steps", "6", "--resume"]) == 0
        assert read_checkpoint(Path(folder) / "checkpoint.pt")["trainer"]["step"] == 6
        assert _quiet_main([*args, "--steps", "8", "--resume", "--d-model", "32"]) == 2   # another model


run_tests(test_command_line_trains_saves_and_resumes)

# %% [markdown]
# Further tests, kept in the notebook and the test suite but not shown here, pin the rest of
# this section: `--resume` refuses every flag outside `RESUME_MAY_CHANGE` by name and accepts
# those; a run killed during a save and resumed writes the same `metrics.jsonl` as a run that
# was never interrupted; the metrics file is valid JSON even with non-finite values; the plot
# is written atomically; and each way the output can fail (an `--out` that is a file or
# read-only, a full disk, a model too large for memory) ends in one line on stderr and the
# exit status of the table above, with no file half-written.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
import errno
import importlib
import json

_TINY_RUN = ["--task", "stack", "--difficulty", "2", "--n-loops", "2", "--d-model", "8", "--n-heads", "2",
             "--batch-size", "4", "--n-train", "40", "--n-test", "10", "--eval-every", "2", "--no-progress"]


def _main_output(argv):
    """(exit status, stderr) of main(argv), its output captured."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, err.getvalue()


def _one_line(err, start):
    """The one line `err` holds, which must start with `start`: no traceback, nothing else."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start) and "Traceback" not in err, err
    return lines[0]


def _read_jsonl(path):
    def invalid(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")
    return [json.loads(line, parse_constant=invalid) for line in Path(path).read_text().splitlines()]


def test_resume_refuses_flags_that_change_the_run():
    with tempfile.TemporaryDirectory() as folder:
        run = [*_TINY_RUN, "--steps", "2", "--out", folder]
        assert _main_output(run)[0] == 0
        path = Path(folder) / "checkpoint.pt"
        flags = read_checkpoint(path)["extra"]["flags"]                 # plain data, read with weights_only
        assert flags["task"] == "stack" and flags["seed"] == 0 and flags["grad_steps"] is None
        assert all(value is None or type(value) in (str, int, float, bool) for value in flags.values())
        before = path.read_bytes()
        for change, message in [
                (["--task", "addition"], "--task is 'stack' in the run being resumed, 'addition' here"),
                (["--difficulty", "3"], "--difficulty is 2 in the run being resumed, 3 here"),
                (["--reverse-answer"], "--reverse-answer is not set in the run being resumed, set here"),
                (["--n-train", "41"], "--n-train is 40 in the run being resumed, 41 here"),
                (["--n-test", "11"], "--n-test is 10 in the run being resumed, 11 here"),
                (["--seed", "1"], "--seed is 0 in the run being resumed, 1 here"),
                (["--lr", "0.01"], "--lr is 0.003 in the run being resumed, 0.01 here"),
                (["--batch-size", "8"], "--batch-size is 4 in the run being resumed, 8 here"),
                (["--step-weights", "uniform"], "--step-weights is 'last' in the run being resumed, 'uniform' here"),
                (["--grad-steps", "1"], "--grad-steps is not set in the run being resumed, 1 here"),
                (["--checkpointing"], "--checkpointing is not set in the run being resumed, set here"),
                (["--n-loops", "3"], "--n-loops is 2 in the run being resumed, 3 here"),
                (["--steps", "1"], "--steps 1: the run being resumed is already at step 2")]:
            status, err = _main_output([*run, *change, "--resume"])
            assert status == 2 and message in _one_line(err, "python -m looplm.train: error: "), (change, err)
        assert path.read_bytes() == before                                # nothing was written
        assert _main_output([*run, "--steps", "3", "--eval-every", "1", "--device", "cpu", "--resume"])[0] == 0
        assert read_checkpoint(path)["trainer"]["step"] == 3


_real_torch_save = torch.save


def _killed_on_save(number):
    """A torch.save that dies (KeyboardInterrupt, like a kill) half way through call `number`."""
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == number:
            f.write(b"the first bytes of a checkpoint")
            raise KeyboardInterrupt
        return _real_torch_save(obj, f, *args, **kwargs)

    return save


def test_resumed_run_writes_the_metrics_of_an_uninterrupted_run():
    with tempfile.TemporaryDirectory() as folder:
        straight, killed = Path(folder) / "straight", Path(folder) / "killed"
        run = [*_TINY_RUN, "--steps", "4"]
        assert _main_output([*run, "--out", str(straight)])[0] == 0
        rows = _read_jsonl(straight / "metrics.jsonl")
        assert [row["step"] for row in rows] == [1, 2, 3, 4]
        assert all({"loss", "lr", "grad_norm", "depth"} <= row.keys() for row in rows)
        assert ["eval_test_acc" in row for row in rows] == [False, True, False, True]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "save", _killed_on_save(2))              # the save at step 4
            with pytest.raises(KeyboardInterrupt):
                _main_output([*run, "--out", str(killed)])
        assert sorted(os.listdir(killed)) == ["checkpoint.pt", "metrics.jsonl"]
        assert [row["step"] for row in _read_jsonl(killed / "metrics.jsonl")] == [1, 2]   # the checkpoint's
        assert _main_output([*run, "--out", str(killed), "--resume"])[0] == 0
        assert _read_jsonl(killed / "metrics.jsonl") == rows


def test_metrics_are_valid_json_even_when_not_finite():
    with tempfile.TemporaryDirectory() as folder:
        history = [{"step": 1, "loss": 0.5, "lr": 1e-3, "consistency": float("nan")},
                   {"step": 2, "loss": 0.25, "lr": 1e-3, "grad_norm": float("inf"), "x": -float("inf")}]
        path = write_metrics(Path(folder) / "metrics.jsonl", history)
        assert _read_jsonl(path) == [{"step": 1, "loss": 0.5, "lr": 1e-3, "consistency": None},
                                     {"step": 2, "loss": 0.25, "lr": 1e-3, "grad_norm": None, "x": None}]
        assert os.listdir(folder) == ["metrics.jsonl"]


def test_loss_plot_is_written_atomically():
    from matplotlib.figure import Figure

    from looplm.train import _plot_history

    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_test_acc": 0.5}]

    def fails_half_way(self, target, **kwargs):
        if isinstance(target, (str, os.PathLike)):
            Path(target).write_bytes(b"half a plot")
        else:
            target.write(b"half a plot")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "loss.png"
        path.write_bytes(b"the previous plot")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Figure, "savefig", fails_half_way)
            with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
                _plot_history(history, path)
        assert path.read_bytes() == b"the previous plot" and os.listdir(folder) == ["loss.png"]
        _plot_history(history, path)
        assert path.read_bytes().startswith(b"\x89PNG") and os.listdir(folder) == ["loss.png"]


run_tests(test_resume_refuses_flags_that_change_the_run, test_resumed_run_writes_the_metrics_of_an_uninterrupted_run,
          test_metrics_are_valid_json_even_when_not_finite, test_loss_plot_is_written_atomically)

# %% tags=["remove-cell", "nbval-check-output"]
#| test
class _FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does (OSError ENOSPC)."""

    def __init__(self, f, room=1000):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def _full_disk_save(obj, f, *args, **kwargs):
    """torch.save onto a disk that fills up after 1000 bytes (torch then raises a RuntimeError from
    the OSError, as it does on a real full disk)."""
    return _real_torch_save(obj, _FullDisk(f), *args, **kwargs)


def test_full_disk_stops_the_run_and_leaves_whole_files():
    no_space = os.strerror(errno.ENOSPC)
    with tempfile.TemporaryDirectory() as folder:
        new, old = Path(folder) / "new", Path(folder) / "old"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "save", _full_disk_save)
            status, err = _main_output([*_TINY_RUN, "--steps", "2", "--out", str(new)])
        line = _one_line(err, f"python -m looplm.train: stopped: could not write {new / 'checkpoint.pt'}: {no_space}")
        assert status == 1 and os.listdir(new) == [], line                # nothing half-written
        assert _main_output([*_TINY_RUN, "--steps", "2", "--out", str(old)])[0] == 0
        before = {name: (old / name).read_bytes() for name in os.listdir(old)}
        for name in ("checkpoint.pt", "metrics.jsonl", "loss.png"):       # what killed writes left
            (old / f".{name}.ab12cd34ef56.tmp").write_bytes(bytes(4096))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "save", _full_disk_save)
            status, err = _main_output([*_TINY_RUN, "--steps", "4", "--out", str(old), "--resume"])
        _one_line(err, f"python -m looplm.train: stopped: could not write {old / 'checkpoint.pt'}: {no_space}")
        # the last complete save is intact, and --resume removed the leftovers before training
        assert status == 1 and {name: (old / name).read_bytes() for name in os.listdir(old)} == before


def test_unwritable_out_gets_one_error_line():
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        a_file = folder / "a_file"
        a_file.write_text("not a folder")
        for out, resume, message in (
                (a_file, [], f"--out {a_file} is a file, not a folder"),
                (a_file, ["--resume"], f"--out {a_file} is a file, not a folder"),
                (a_file / "run", [], f"--out {a_file / 'run'} is not a folder this process can write to"),
                (a_file / "run", ["--resume"], f"--resume: there is no {a_file / 'run' / 'checkpoint.pt'}")):
            status, err = _main_output([*_TINY_RUN, "--steps", "2", "--out", str(out), *resume])
            assert status == 2 and message in _one_line(err, "python -m looplm.train: error: "), err
        read_only, resumable = folder / "read_only", folder / "resumable"
        read_only.mkdir()
        assert _main_output([*_TINY_RUN, "--steps", "2", "--out", str(resumable)])[0] == 0
        before = {name: (resumable / name).read_bytes() for name in os.listdir(resumable)}
        attempts = [(read_only, []), (read_only / "run", []), (resumable, ["--steps", "4", "--resume"])]

        def check():
            for out, extra in attempts:
                status, err = _main_output([*_TINY_RUN, "--steps", "2", "--out", str(out), *extra])
                line = _one_line(err, "python -m looplm.train: error: ")
                assert status == 2 and f"--out {out} is not a folder this process can write to" in line, err
            assert os.listdir(read_only) == []
            assert {name: (resumable / name).read_bytes() for name in os.listdir(resumable)} == before

        if getattr(os, "geteuid", lambda: 0)() != 0:       # root writes to read-only folders all the same
            for path in (read_only, resumable):
                path.chmod(0o555)
            try:
                check()
            finally:
                for path in (read_only, resumable):
                    path.chmod(0o755)
        # as root too: the file system refuses to create anything in the two folders
        real_open, real_mkdir = os.open, os.mkdir

        def refused(path):
            return any(Path(path).is_relative_to(p) for p in (read_only, resumable))

        def open_(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and refused(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            if refused(path) and not Path(path).is_dir():
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "open", open_)
            patch.setattr(os, "mkdir", mkdir)
            check()


def test_memory_errors_get_one_line():
    train_module = importlib.import_module("looplm.train")
    allocation_failed = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                         "memory: you tried to allocate 1536000000 bytes. Error code 12 (Cannot allocate memory)")

    class TooLarge:
        def __init__(self, config):
            raise RuntimeError(allocation_failed)

    def no_memory_left(self):
        raise RuntimeError(allocation_failed)

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        status, err = _main_output([*_TINY_RUN, "--d-model", "100000000", "--out", str(out)])
        assert status == 2 and "d_model=100000000 makes this model too large" in _one_line(
            err, "python -m looplm.train: error: ")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_module, "LoopLM", TooLarge)
            status, err = _main_output([*_TINY_RUN, "--out", str(out)])
        assert status == 2 and "the model of --d-model 8 and --n-core 1 does not fit in this machine's memory" in \
            _one_line(err, "python -m looplm.train: error: ")
        assert not out.exists()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_module.Trainer, "_train_step", no_memory_left)
            status, err = _main_output([*_TINY_RUN, "--out", str(out)])
        assert status == 1 and "out of memory while training" in _one_line(err, "python -m looplm.train: stopped: ")
        assert os.listdir(out) == []


run_tests(test_full_disk_stops_the_run_and_leaves_whole_files, test_unwritable_out_gets_one_error_line,
          test_memory_errors_get_one_line)

# %% [markdown]
# ## 4.11 What does the package cost? A benchmark
#
# `LoopLM` checks its inputs on every call, runs through registry modules, and reads out a
# prediction after every step. All of that costs time. How much? The honest way to find out
# is to write the same model a second time with none of it, in plain PyTorch, and race the
# two. That is `looplm/bench.py`:
#
# ```
# python -m looplm.bench train --steps 20 --d-model 128 --device cpu
# ```

# %% [markdown]
# The minimal model has the same parts with the same shapes: an embedding, one pre-norm block
# (RMSNorm, attention with rotary embeddings, SwiGLU) applied $S$ times, a final norm and a
# tied head, and it reads out only after the last step. Forty lines, no checks:

# %%
#| export bench
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from looplm.backprop import make_loop_loss
from looplm.model import LoopLM, LoopLMConfig, _require_int
from looplm.train import default_loss


class _Norm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MinimalLoopedLM(nn.Module):
    """A looped LM in plain PyTorch: embed -> one pre-norm block x n_loops -> norm -> tied head.

    No input checks, no registries, one readout. The baseline of `python -m looplm.bench train`.
    """

    def __init__(self, vocab_size, d_model, n_heads, d_hidden, n_loops, max_seq_len, eps=1e-6):
        super().__init__()
        self.n_heads, self.n_loops = n_heads, n_loops
        self.embed = nn.Embedding(vocab_size, d_model)
        self.norm1, self.norm2, self.norm = _Norm(d_model, eps), _Norm(d_model, eps), _Norm(d_model, eps)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(d_model, d_hidden, bias=False)
        self.up = nn.Linear(d_model, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)
        head_dim = d_model // n_heads
        inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, hs/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def block(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)

        def rope(t):                                                # (B, nh, T, hs)
            a, b = t.chunk(2, dim=-1)
            return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)     # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))

    def forward(self, idx):
        T = idx.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]
        h = self.embed(idx)                                         # (B, T, C)
        for _ in range(self.n_loops):
            h = self.block(h, cos, sin)
        return F.linear(self.norm(h), self.embed.weight)            # (B, T, V), tied head

# %% [markdown]
# A race is only fair if both run the same arithmetic, so the benchmark copies a `LoopLM`'s
# weights into the minimal model and checks that the last step's logits agree before it times
# anything.

# %%
#| export bench
def minimal_from_looplm(model):
    """A MinimalLoopedLM holding a LoopLM's weights (one pre-norm core block, tied head, no
    prelude, coda, injection or gate): same logits as model(idx).logits[-1]."""
    c = model.config
    if (c.n_prelude, c.n_core, c.n_coda, c.norm_style, c.tie_embeddings, c.injection, c.exit_gate) != \
            (0, 1, 0, "pre", True, "none", False) or c.init_state != "embedding":
        raise ValueError("the minimal model mirrors a LoopLM with one pre-norm core block, a tied head "
                         "and no prelude, coda, injection or exit gate")
    block = model.core[0]
    minimal = MinimalLoopedLM(c.vocab_size, c.d_model, c.n_heads, block.d_hidden, c.n_loops, c.max_seq_len, c.eps)
    with torch.no_grad():
        minimal.embed.weight.copy_(model.embed.weight)
        minimal.norm1.weight.copy_(block.norms[0].weight)
        minimal.norm2.weight.copy_(block.norms[1].weight)
        minimal.norm.weight.copy_(model.norm.weight)
        for mine, theirs in ((minimal.qkv, block.attn.qkv), (minimal.proj, block.attn.proj),
                             (minimal.gate, block.mlp.gate), (minimal.up, block.mlp.up),
                             (minimal.down, block.mlp.down)):
            mine.weight.copy_(theirs.weight)
    return minimal.to(next(model.parameters()).device)

# %% [markdown]
# The timing loop. One training step is the same for every contestant: the loss, `backward`,
# gradient clipping at 1.0, an AdamW step. The contestants take turns, in alternating order,
# `repeats` times; each turn times `steps` training steps; the result is the median turn. On a
# shared or throttling machine, turns that alternate see the same conditions on average,
# which two long separate runs would not.

# %%
#| export bench
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _train_step(model, loss_fn, optimizer, idx, targets):
    def step():
        loss = loss_fn(model, idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return step


def bench_train(d_model=128, n_heads=4, n_loops=4, batch_size=16, seq_len=64, vocab_size=256,
                steps=10, repeats=7, device="cpu", seed=0):
    """Training throughput of LoopLM (two loss paths) against MinimalLoopedLM, in one run.

    -> dict with "rows": [(name, steps per second, tokens per second)], the minimal model first,
    "max_logit_difference" (identical weights, last-step logits) and "settings".
    """
    for name, value in (("steps", steps), ("repeats", repeats), ("batch_size", batch_size), ("seq_len", seq_len)):
        _require_int(name, value, 1)
    torch.manual_seed(seed)
    config = LoopLMConfig(vocab_size, d_model, n_heads, n_loops=n_loops, max_seq_len=seq_len)
    models = {name: LoopLM(config).to(device) for name in ("default", "lean")}
    models["lean"].load_state_dict(models["default"].state_dict())
    minimal = minimal_from_looplm(models["default"])
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    targets = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    with torch.no_grad():
        difference = (models["default"](idx).logits[-1] - minimal(idx)).abs().max().item()

    lean_loss = make_loop_loss()
    contestants = {
        "minimal looped model (plain PyTorch)": (minimal, lambda m, i, t: F.cross_entropy(
            m(i).flatten(0, 1), t.flatten())),
        "LoopLM + make_loop_loss()": (models["lean"], lambda m, i, t: lean_loss(m, i, t)[0]),
        "LoopLM + default_loss": (models["default"], lambda m, i, t: default_loss(m, i, t)[0]),
    }
    steps_fns = {}
    for name, (model, loss_fn) in contestants.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        steps_fns[name] = _train_step(model, loss_fn, optimizer, idx, targets)
        for _ in range(2):                                          # warm up
            steps_fns[name]()
    seconds = {name: [] for name in contestants}
    order = list(contestants)
    for turn in range(repeats):
        for name in (order if turn % 2 == 0 else order[::-1]):
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                steps_fns[name]()
            _sync(device)
            seconds[name].append((time.perf_counter() - start) / steps)
    rows = [(name, 1 / statistics.median(s), batch_size * seq_len / statistics.median(s))
            for name, s in seconds.items()]
    settings = dict(d_model=d_model, n_heads=n_heads, n_loops=n_loops, batch_size=batch_size,
                    seq_len=seq_len, vocab_size=vocab_size, steps=steps, repeats=repeats,
                    device=str(device), threads=torch.get_num_threads())
    return {"rows": rows, "max_logit_difference": difference, "settings": settings}

# %% [markdown]
# The report: a table with the overhead of each `LoopLM` path relative to the minimal model
# (positive: slower), and a bar plot.

# %%
#| export bench
def format_train_table(result):
    s = result["settings"]
    lines = [f"training throughput: d_model {s['d_model']}, {s['n_heads']} heads, {s['n_loops']} loops, "
             f"batch {s['batch_size']} x {s['seq_len']} tokens, vocab {s['vocab_size']}, {s['device']} "
             f"({s['threads']} threads); median of {s['repeats']} turns of {s['steps']} steps",
             f"same weights, last-step logits: max |difference| = {result['max_logit_difference']:.1e}",
             "",
             f"{'model':40s} {'steps/s':>9s} {'tokens/s':>10s} {'overhead':>9s}"]
    base = result["rows"][0][1]
    for name, steps_per_s, tokens_per_s in result["rows"]:
        overhead = "" if steps_per_s == base and name == result["rows"][0][0] else f"{base / steps_per_s - 1:+.1%}"
        lines.append(f"{name:40s} {steps_per_s:9.2f} {tokens_per_s:10,.0f} {overhead:>9s}")
    return "\n".join(lines)


def plot_train(result, path):
    from matplotlib.figure import Figure

    names = [row[0] for row in result["rows"]]
    fig = Figure(figsize=(7, 2.8))
    ax = fig.add_subplot()
    ax.barh(names[::-1], [row[2] for row in result["rows"]][::-1], color=["C2", "C1", "C0"][:len(names)])
    ax.set(xlabel="training tokens per second", title="python -m looplm.bench train")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

# %% [markdown]
# The command line has subcommands, kept in a dictionary so that later chapters can add their
# own benchmarks (decoding, kernels) next to `train`. Bad input gets what `python -m
# looplm.train` gives it: one line, `python -m looplm.bench: error: …`, and exit status 2. The
# train benchmark checks its own flags before building anything, with messages that name the
# flag; and `main` turns the `ValueError`, `TypeError`, `FileNotFoundError` or
# `CheckpointError` (a `ValueError`) that any registered benchmark raises for bad input into
# that line, so a later chapter's benchmark only has to raise them. A file that cannot be
# written gets exit status 2 too, if the path is the problem (a missing or read-only folder),
# and 1 with `stopped: …` otherwise (a full disk).

# %%
#| export bench
def _train_arguments(parser):
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed turn (default 10)")
    parser.add_argument("--repeats", type=int, default=7, help="timed turns per model (default 7)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--n-loops", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", default="build/bench/train.png", help="bar plot (default build/bench/train.png)")


def _check_train_flags(args):
    """ValueError naming the flag, for settings the train benchmark cannot run."""
    for dest in ("steps", "repeats", "d_model", "n_heads", "n_loops", "batch_size", "seq_len", "vocab_size"):
        value = getattr(args, dest)
        if value < 1:
            raise ValueError(f"--{dest.replace('_', '-')} must be >= 1, got {value}")
    if args.d_model % args.n_heads:
        raise ValueError(f"--n-heads {args.n_heads} must divide --d-model {args.d_model}")
    if (args.d_model // args.n_heads) % 2:
        raise ValueError(f"--d-model / --n-heads = {args.d_model // args.n_heads} must be even "
                         f"(rotary embeddings rotate pairs of dimensions)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda (cuda:N), got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")


def _train_command(args):
    _check_train_flags(args)
    result = bench_train(d_model=args.d_model, n_heads=args.n_heads, n_loops=args.n_loops,
                         batch_size=args.batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size,
                         steps=args.steps, repeats=args.repeats, device=args.device)
    print(format_train_table(result))
    print(f"\nsaved {plot_train(result, args.out)}")
    return 0


# name -> (help, add_arguments(parser), run(args) -> exit status)
BENCHMARKS = {"train": ("training throughput: LoopLM against a minimal looped model", _train_arguments,
                        _train_command)}


def main(argv=None):
    """python -m looplm.bench <benchmark> [options]; see --help."""
    parser = argparse.ArgumentParser(prog="python -m looplm.bench", description="looplm benchmarks")
    commands = parser.add_subparsers(dest="benchmark", required=True)
    for name, (help_text, add_arguments, _) in BENCHMARKS.items():
        add_arguments(commands.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        return BENCHMARKS[args.benchmark][2](args)
    except (ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError) as e:
        print(f"python -m looplm.bench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"python -m looplm.bench: stopped: {e}", file=sys.stderr)
        return 1

# %%
#| export bench
if __name__ == "__main__" and "get_ipython" not in globals() and globals().get("__spec__") is not None:
    # `python -m looplm.bench`. The export places this cell last in looplm/bench.py, after the
    # benchmarks later chapters register.
    sys.exit(main())

# %% [markdown]
# A short run on this machine. Timings vary from machine to machine and from run to run, so
# this cell is not checked; the numbers discussed below are from the run stored with the
# notebook.

# %% tags=["timing"]
bench_plot = Path(tempfile.mkdtemp(prefix="looplm-bench-")) / "train.png"
bench = subprocess.run([sys.executable, "-m", "looplm.bench", "train", "--steps", "3", "--repeats", "5",
                        "--out", str(bench_plot)], capture_output=True, text=True)
print(bench.stdout.replace(str(bench_plot), "train.png"), bench.stderr[-2000:])

# %% tags=["timing"]
display(Image(filename=bench_plot))

# %% [markdown]
# Timings on a shared machine move from run to run, so read the table above together with
# these: in the runs we made on a two-core machine (this cell, and the command with its
# defaults), `LoopLM` with `make_loop_loss()` was between 1% faster and 7% slower than the
# minimal model, a spread of the size of the run-to-run noise, and with `default_loss` it was
# 15% to 25% slower.
#
# The cause of that gap is the readouts, not the checks. `default_loss` calls
# `model(idx, targets=...)`, which reads out after *every* step: four head projections onto
# the 256-token vocabulary and four cross-entropies where the minimal model computes one.
# `make_loop_loss()` with its default `"last"` weights asks `loop_forward` for the last
# readout only. Everything else `LoopLM` does beyond the minimal model (checking token ids and
# targets on every call, checking shapes in every block, the registry modules for injection
# and initial state) is in both `LoopLM` rows, and the first row shows it costs too little to
# measure at this size. So the rule for training is: if the loss uses only the last step,
# don't compute the others.

# %% [markdown]
# A test keeps the benchmark honest: the minimal model must compute exactly what `LoopLM`
# computes, and a one-step benchmark must run and report all three rows.

# %% tags=["nbval-check-output"]
#| test
from looplm.bench import MinimalLoopedLM, bench_train, format_train_table, minimal_from_looplm


def test_minimal_model_matches_looplm_and_the_benchmark_runs():
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=40, d_model=32, n_heads=4, n_loops=3, max_seq_len=16))
    idx = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(minimal_from_looplm(model)(idx), model(idx).logits[-1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one pre-norm core block"):
        minimal_from_looplm(LoopLM(LoopLMConfig(vocab_size=40, d_model=32, n_heads=4, n_core=2)))
    result = bench_train(d_model=32, n_heads=4, n_loops=2, batch_size=2, seq_len=8, vocab_size=40,
                         steps=1, repeats=1)
    assert [row[0] for row in result["rows"]] == ["minimal looped model (plain PyTorch)",
                                                  "LoopLM + make_loop_loss()", "LoopLM + default_loss"]
    assert result["max_logit_difference"] <= 1e-6 and "overhead" in format_train_table(result)


run_tests(test_minimal_model_matches_looplm_and_the_benchmark_runs)

# %% [markdown]
# Another test, not shown here, gives the benchmark command line bad flags and a benchmark
# registered for the test that raises each kind of error, and checks that each ends in one
# line on stderr and exit status 2 (1 for a full disk).

# %% tags=["remove-cell", "nbval-check-output"]
#| test
from looplm.bench import BENCHMARKS, main as bench_main      # the package's (the notebook has its own copies)


def _bench_output(argv):
    """(exit status, stderr) of python -m looplm.bench's main(argv), its output captured."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = bench_main(argv)
    return status, err.getvalue()


def test_bench_bad_input_gets_one_error_line():
    cases = [(["--steps", "0"], "--steps must be >= 1, got 0"),
             (["--repeats", "0"], "--repeats must be >= 1, got 0"),
             (["--n-loops", "0"], "--n-loops must be >= 1, got 0"),
             (["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
             (["--d-model", "30", "--n-heads", "4"], "--n-heads 4 must divide --d-model 30"),
             (["--d-model", "12", "--n-heads", "4"], "--d-model / --n-heads = 3 must be even"),
             (["--device", "tpu"], "--device must be cpu or cuda (cuda:N), got 'tpu'")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: CUDA is not available on this machine"))
    for flags, message in cases:
        status, err = _bench_output(["train", *flags])
        assert status == 2 and message in _one_line(err, "python -m looplm.bench: error: "), (flags, err)

    errors = {"value": ValueError("--size must be > 0, got 0"), "type": TypeError("--size must be an int"),
              "missing": FileNotFoundError("--checkpoint: no checkpoint at x.pt"),
              "checkpoint": CheckpointError("--checkpoint: x.pt is not a looplm checkpoint"),
              "read-only": PermissionError(errno.EACCES, os.strerror(errno.EACCES), "plots/x.png"),
              "full": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "plots/x.png")}

    def run(args):
        raise errors[args.kind]

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(BENCHMARKS, "failing", ("raises the error it is told to", lambda p: p.add_argument("--kind"), run))
        for kind, error in errors.items():
            status, err = _bench_output(["failing", "--kind", kind])
            start = "python -m looplm.bench: stopped: " if kind == "full" else "python -m looplm.bench: error: "
            assert status == (1 if kind == "full" else 2) and _one_line(err, start) == start + str(error), err


run_tests(test_bench_bad_input_gets_one_error_line)

# %% [markdown]
# ## 4.12 Bad input gets a clear error
#
# Every function of this chapter checks its arguments. A few of the mistakes it catches:

# %%
def show_error(make):
    """Call make(); print the exception it raises."""
    try:
        make()
    except Exception as e:  # noqa: BLE001
        print(f"{type(e).__name__}: {e}")
    else:
        print("no error")

# %% [markdown]
# Step weights of the wrong length or sign, a truncation longer than the loop, a zero step
# count, an impossible depth distribution, and options that contradict each other:

# %% tags=["nbval-check-output"]
show_error(lambda: weighted_step_loss(out.step_losses, targets, [1.0, 1.0, 1.0]))
show_error(lambda: weighted_step_loss(out.step_losses, targets, [1.0, -1.0, 1.0, 1.0]))
show_error(lambda: weighted_step_loss(out.step_losses, targets, "exponential"))
show_error(lambda: loop_forward(model, idx, targets, grad_steps=0))
show_error(lambda: loop_forward(model, idx, targets, n_loops=3, grad_steps=4))
show_error(lambda: loop_forward(model, idx, targets, n_loops=0))
show_error(lambda: sample_depth(0))
show_error(lambda: make_loop_loss(step_weights=[1, 2, 3, 4], sample_depth=4))
show_error(lambda: make_loop_loss(norm_penalty=-0.1))

# %% [markdown]
# Checkpoints: one made for another model, one from a newer looplm, one whose weights hold a
# NaN, and a file that is not a checkpoint at all. (The folder's name is replaced by `DIR` so
# that the messages print the same on every run.)

# %% tags=["nbval-check-output"]
with tempfile.TemporaryDirectory() as folder:
    trainer = Trainer(LoopLM(config), get_batch, TrainConfig(steps=2, warmup_steps=1, progress=False))
    path = save_checkpoint(Path(folder) / "checkpoint.pt", trainer)
    wider = LoopLM(LoopLMConfig(TASK_VOCAB.vocab_size, d_model=96, n_heads=4, n_loops=8, max_seq_len=16))
    payload = torch.load(path, weights_only=True)
    payload["looplm_version"] = "9.0.0"
    torch.save(payload, Path(folder) / "newer.pt")
    payload["looplm_version"] = looplm.__version__
    payload["trainer"]["model"]["core.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(payload, Path(folder) / "nan.pt")
    (Path(folder) / "notes.txt").write_text("not a checkpoint")
    for make in (lambda: load_checkpoint(path, get_batch, model=wider),
                 lambda: load_checkpoint(Path(folder) / "newer.pt", get_batch),
                 lambda: load_checkpoint(Path(folder) / "nan.pt", get_batch),
                 lambda: read_checkpoint(Path(folder) / "notes.txt")):
        try:
            make()
        except CheckpointError as e:
            print("CheckpointError:", str(e).replace(folder, "DIR"))

# %% [markdown]
# The command lines answer bad input with one line on stderr and exit status 2: a resume with
# another task, an `--out` that names a file, a benchmark with a width its heads do not
# divide, one with no steps to time.

# %% tags=["nbval-check-output"]
from looplm.bench import main as bench_main


def show_command_error(command_main, argv):
    """Run a command line's main(argv); print its exit status and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = command_main(argv)
    print(f"exit status {status}:", err.getvalue().strip().replace(str(run_folder), "DIR"))


show_command_error(train_main, flags + ["--resume", "--task", "stack"])
show_command_error(train_main, flags + ["--out", str(run_folder / "loss.png")])
show_command_error(bench_main, ["train", "--d-model", "30", "--n-heads", "4"])
show_command_error(bench_main, ["train", "--steps", "0"])

# %% [markdown]
# The tests pin these messages:

# %% tags=["nbval-check-output"]
#| test
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


run_tests(test_bad_arguments_get_clear_errors)

# %% [markdown]
# ## Summary
#
# `looplm/backprop.py`:
#
# | name | what it does |
# |---|---|
# | `step_weights(scheme, n_steps)`, `STEP_WEIGHTS` | `"last"`, `"uniform"`, `"linear"` weights, normalised to sum 1 |
# | `weighted_step_loss(step_losses, targets, weights="last")` | $\sum_t \bar w_t L_t$, $L_t$ the mean loss of step $t$ over learned tokens |
# | `saved_tensor_bytes(fn, exclude=())` | bytes autograd saves for backward while `fn` runs (distinct storages) |
# | `loop_forward(model, idx, targets=None, n_loops=None, grad_steps=None, checkpoint=False, return_hidden=False, readout="all")` | the training loop runner: truncated backpropagation, per-step activation checkpointing; forward values equal `model(...)` |
# | `scale_core_grads(model, factor)` | multiply the core's gradients by `factor` |
# | `sample_depth(mean_steps, sigma=0.5, generator=None)` | Huginn's depth, $\mathrm{Poisson}(e^\tau) + 1$; mean $\bar r + 1$ |
# | `hidden_norm_penalty(hidden)`, `step_consistency(logits, targets)` | the two optional regularizers |
# | `LoopLoss`, `make_loop_loss(step_weights="last", grad_steps=None, checkpoint=False, sample_depth=None, norm_penalty=0.0, consistency=0.0, **options)` | a `loss_fn` for `Trainer` with all of the above; `state_dict()` for exact resumption |
#
# `looplm/train.py` gains `save_checkpoint(path, trainer, extra=None)` (atomic, and it removes
# what killed saves left behind), `read_checkpoint(path)` (refuses NaN or inf weights),
# `checkpoint_model(path, payload, model=None)`,
# `load_checkpoint(path, get_batch, config=None, *, model=None, loss_fn=None, evaluate=None, payload=None)`,
# `CheckpointError`, `write_metrics(path, history)` (JSON lines, atomic), and the command line
# `python -m looplm.train` (`main(argv)`), which writes `checkpoint.pt`, `metrics.jsonl` and
# `loss.png` and resumes only with the same flags (except those in `RESUME_MAY_CHANGE`).
# `looplm/bench.py` holds `python -m looplm.bench train`, `MinimalLoopedLM` and `bench_train`;
# both command lines answer bad input with one `error:` line and exit status 2.

# %% [markdown]
# What we measured:
#
# - the gradient of the shared core is exactly the sum of its per-step terms;
# - activation memory grows linearly with the step count, about 26.5 hidden states per step
#   for one pre-norm block and its readout; checkpointing cuts the slope about 19-fold, to
#   one state plus the readout's log-probabilities; truncation makes it flat;
# - the core's gradient grows with depth in an untrained loop, but far more slowly than the
#   step count; in a trained loop it follows the loss, smallest at the trained depth; Adam's
#   update barely notices a constant rescaling of it;
# - Huginn's sampler has mean $\bar r + 1$ and a long tail;
# - on the stack task, after 600 steps, a fixed depth of 4 gave a model that is perfect at
#   3 to 5 steps and degrades beyond; a randomized depth of the same mean gave a weaker but
#   flatter curve;
# - `LoopLM` trains as fast as a minimal looped model written in plain PyTorch when its loss
#   reads out the last step only, and measurably slower when every step is read out.
#
# Chapter 5 puts a gate on the readouts: the model learns for itself how many steps a token
# needs, and the per-step losses of this chapter become the raw material of its training
# objective.

# %% [markdown]
# ## Exercises
#
# Each exercise is a module in `exercises/ch04/` with a function for you to write, plus a file
# of graded tests next to it. Open the module, read its docstring, and replace the
# `raise NotImplementedError(...)`. The reference solutions are in `exercises/solutions/ch04/`,
# to read after you have tried.

# %% [markdown]
# **Exercise 4.1: Truncated backpropagation** (`ex1_truncated_backprop.py`). Write
# `truncated_logits(model, idx, n_loops, grad_steps)`, which runs a `LoopLM` step by step and
# returns the logits of every step, $[S, B, T, V]$, with the first $S - k$ steps run without
# gradients, as Huginn trains. The tests check the values against the model, the gradients
# against a reference that detaches the state, and that the early readouts carry no gradient.

# %% [markdown]
# **Exercise 4.2: The weighted per-step loss** (`ex2_weighted_step_loss.py`). Write
# `weighted_loss(step_losses, targets, weights)`: the normalised weighted average of the
# per-step mean losses of section 4.1, for explicit weights and the three named schemes,
# refusing bad weights. The tests compare with a reference written with loops.

# %% [markdown]
# The next cell grades your versions. Run it again whenever you like; every test fails until
# you write the code.

# %%
from looplm.grade import grade

report = grade("ch04")
