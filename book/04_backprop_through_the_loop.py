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
# Published looped models answer these in different ways. Huginn {cite:p}`geiping2025huginn`
# draws a fresh step count for every batch and backpropagates through the last $k = 8$ steps
# only. {cite:t}`yang2024looped` average the loss over a window of the last steps and run the
# earlier ones without gradients. TRM {cite:p}`jolicoeurmartineau2025trm` supervises the model
# again and again on a detached state. Ouro {cite:p}`zhu2025ouro` puts a loss on every step. This chapter builds
# the machinery behind all of them and measures what each piece costs.

# %% [markdown]
# The plan:
#
# 1. a loss at every step, and a weighted sum of them;
# 2. the gradient of a shared weight, checked with `gradcheck` and split into its per-step terms;
# 3. activation memory, measured, as a function of the step count;
# 4. truncated backpropagation and activation checkpointing, two options of the one loop;
# 5. how the gradient's size depends on the step count, and what to do about it;
# 6. randomized depth, Huginn's way;
# 7. a loss function for chapter 3's `Trainer` with all of the above as options, plus two
#    optional regularizers;
# 8. an experiment: fixed against randomized depth;
# 9. what Appendix C adds around it: checkpoints, a command line for training, a benchmark;
# 10. clear errors for bad input.
#
# The loss machinery goes to `looplm/backprop.py`.

# %% tags=["hide-input"]
import contextlib
import io
import math
import os
import statistics
import subprocess
import inspect
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import Image, display

import looplm
from looplm.backprop import LoopLoss, make_loop_loss
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

# %% tags=["hide-input"]
#| export
import math

import torch

from looplm.checks import require_bool, require_int, require_number
from looplm.data import IGNORE_INDEX
from looplm.model import LoopLM

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
# Write $L_t$ for step $t$'s mean loss over the learned tokens $\mathcal{M}$ (the positions whose
# target is not `IGNORE_INDEX`):
#
# $$
# L_t = \frac{1}{|\mathcal{M}|} \sum_{(b, i) \in \mathcal{M}} \ell_{t, b, i}, \qquad
# \mathcal{L} = \sum_{t=1}^{S} \bar w_t L_t, \qquad \bar w_t = \frac{w_t}{\sum_{j=1}^{S} w_j}.
# $$
#
# The weights are **normalised**: $\mathcal{L}$ is a weighted *average* of the per-step
# losses, so its size does not depend on how many steps ran, and the "last" scheme gives
# exactly `out.loss`.

# %% [markdown]
# Three schemes cover what the published models do:
#
# - `"last"`: $w = (0, \dots, 0, 1)$. Only the final readout is trained
#   {cite:p}`geiping2025huginn,fan2025looped`.
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
    require_int("n_steps", n_steps, 1)
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

# %% tags=["remove-cell", "nbval-check-output"]
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
# readout's own term at every step that has a loss (backpropagation through time
# {cite:p}`werbos1990bptt`):
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

# %% tags=["remove-cell", "nbval-check-output"]
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

# %% tags=["remove-cell", "nbval-check-output"]
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

# %% tags=["remove-cell", "nbval-check-output"]
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
# ## 4.4 Two training options of the one loop
#
# Run plainly, `LoopLM.forward` records every step for autograd. Training wants two more
# ways to run the same loop, and chapter 2 already gave `forward` the arguments for them,
# so that training, evaluation and decoding all run one definition of a loop step.

# %% [markdown]
# **Truncated backpropagation** (Huginn {cite:p}`geiping2025huginn`; {cite:t}`yang2024looped` in a
# windowed form). Run the first
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
# **Activation checkpointing** {cite:p}`chen2016checkpointing`. Wrap each step in `torch.utils.checkpoint.checkpoint`: during the
# forward pass the step saves only its inputs; during the backward pass it runs again, this
# time saving its intermediates, and they are used and freed right away. The gradient is
# exact, the memory per step drops to one hidden state plus what the readout's loss keeps,
# and the cost is a second forward pass of every step.

# %% [markdown]
# Both are arguments of `forward`: `grad_steps=k` and `checkpoint=True`. A third,
# `readout="last"`, skips the readouts of all steps but the last, for losses that do not use
# them (the memory measurements below show what that saves). Here is the loop of `forward` from chapter 2,
# read back from the package. Steps $1, \dots, S - k$ run without gradients; their readouts
# are still computed and returned (detached), so the output has the same fields either way.
# The remaining steps run with autograd, each inside a checkpoint if asked (`step_routed` is what
# a mixture of experts chose at the step, chapter 9; it is returned from the checkpointed step
# so that a recomputed step is not counted twice):

# %% tags=["hide-input"]
forward_source = inspect.getsource(LoopLM.forward).splitlines()
loop_start = next(i for i, line in enumerate(forward_source) if "for t in range(n_loops)" in line)
print(textwrap.dedent("\n".join(forward_source[loop_start:loop_start + 15])))

# %% [markdown]
# The same call is also a function of this module, `loop_forward(model, idx, ...)`, for code
# that passes the model around rather than calling it; it is one line:

# %%
#| export
def loop_forward(model, idx, targets=None, n_loops=None, grad_steps=None, checkpoint=False,
                 return_hidden=False, readout="all"):
    """model(idx, targets, n_loops=, grad_steps=, checkpoint=, return_hidden=, readout=): LoopLM.forward
    with its training options. -> LoopOutput."""
    if not isinstance(model, LoopLM):
        raise TypeError(f"model must be a LoopLM, got {type(model).__name__}")
    return model(idx, targets, n_loops=n_loops, grad_steps=grad_steps, checkpoint=checkpoint,
                 return_hidden=return_hidden, readout=readout)

# %% [markdown]
# The figure asks the runner itself which steps it differentiates, for $S = 8$ steps and a loss
# at every step: a hook on the core records whether autograd was recording at each step, and
# one backward pass per step loss $L_t$ shows whether it reaches the core's weights. Look at the
# lower row. With `grad_steps=3` the first five steps still run and their losses are still
# computed, but they are greyed: nothing was recorded for them, and $L_1, \dots, L_5$ send no
# gradient anywhere. The gradient arrow stops at $h_5$, the state the last three steps start
# from.

# %% tags=["hide-input"]
from matplotlib.colors import to_rgba
from matplotlib.patches import FancyBboxPatch


def which_steps_get_gradient(model, grad_steps):
    """-> ([S] bools: the step ran with autograd recording, [S] bools: L_t reaches the core's weights)."""
    idx_probe = torch.zeros(1, 4, dtype=torch.long)
    recording = []
    hook = model.core[0].register_forward_hook(lambda module, args, output: recording.append(output.requires_grad))
    out = model(idx_probe, idx_probe, grad_steps=grad_steps)
    hook.remove()
    core = list(model.core.parameters())
    reaches = []
    for step_loss in out.step_losses:
        grads = torch.autograd.grad(step_loss.sum(), core, retain_graph=True, allow_unused=True)
        reaches.append(any(g is not None and bool(g.abs().sum() > 0) for g in grads))
    return recording, reaches


def draw_gradient_chain(ax, model, grad_steps):
    """One run as a chain of core steps R with their losses L_t: blue and red where gradients flow."""
    recorded, reaches = which_steps_get_gradient(model, grad_steps)
    S = len(recorded)
    for t in range(1, S + 1):
        live, colour = recorded[t - 1], "C0" if recorded[t - 1] else "0.6"
        ax.add_patch(FancyBboxPatch((t - 0.32, 1.65), 0.64, 0.7, boxstyle="round,pad=0,rounding_size=0.1",
                                    edgecolor=colour, facecolor=to_rgba(colour, 0.2), linewidth=1.3,
                                    hatch=None if live else "////"))
        ax.text(t, 2.0, "R", ha="center", va="center", fontsize=10, color="black" if live else "0.45")
        ax.annotate("", xy=(t - 0.34, 2.0), xytext=(t - 0.66, 2.0),
                    arrowprops=dict(arrowstyle="-|>", color="0.3", linewidth=1.1, shrinkA=0, shrinkB=0))
        ax.plot([t, t], [1.65, 1.05], color="0.3", linewidth=1.1)      # the readout of step t
        loss_colour = "C3" if reaches[t - 1] else "0.6"
        ax.plot(t, 0.75, "o", markersize=19, markeredgecolor=loss_colour, markeredgewidth=1.3,
                markerfacecolor=to_rgba(loss_colour, 0.15 if reaches[t - 1] else 0.08))
        ax.text(t, 0.75, f"$L_{t}$", ha="center", va="center", fontsize=9,
                color="black" if reaches[t - 1] else "0.5")
        if reaches[t - 1]:                                             # the gradient of L_t enters step t
            ax.annotate("", xy=(t + 0.13, 1.62), xytext=(t + 0.13, 1.05),
                        arrowprops=dict(arrowstyle="-|>", color="C3", linewidth=1.3, shrinkA=0, shrinkB=0))
    first = recorded.index(True) + 1                                   # the first differentiated step
    ax.annotate("", xy=(first - 0.45, 2.55), xytext=(S + 0.3, 2.55),
                arrowprops=dict(arrowstyle="-|>", color="C3", linewidth=1.5, shrinkA=0, shrinkB=0))
    ax.text((first + S) / 2, 2.62, "gradient", color="C3", ha="center", va="bottom", fontsize=9)
    ax.text(0.3, 2.0, "$h_0$", ha="right", va="center", fontsize=10)
    ax.text(S + 0.45, 2.0, f"$h_{S}$", ha="left", va="center", fontsize=10)
    if first > 1:
        ax.plot([first - 0.5] * 2, [1.2, 2.45], color="0.3", linestyle=":", linewidth=1.2)
        ax.text(first / 2, 2.62, "torch.no_grad(): nothing saved", color="0.4",
                ha="center", va="bottom", fontsize=9)
        ax.text(first - 0.5, 1.3, f"$h_{first - 1}$ detached", color="0.3", ha="center", va="center",
                fontsize=8, bbox=dict(facecolor="white", edgecolor="none", pad=1))
    ax.set(xlim=(-0.2, S + 0.9), ylim=(0.3, 3.0))
    ax.axis("off")


with torch.random.fork_rng():                      # building the model leaves the chapter's seed alone
    chain_model = LoopLM(LoopLMConfig(TASK_VOCAB.vocab_size, 16, 2, n_loops=8))
fig, axes = plt.subplots(2, 1, figsize=(8, 4.4))
for ax, grad_steps in zip(axes, (None, 3)):
    draw_gradient_chain(ax, chain_model, grad_steps)
    ax.set_title("full backpropagation (grad_steps=None)" if grad_steps is None
                 else f"truncated (grad_steps={grad_steps})", fontsize=10, loc="left")
plt.tight_layout()
plt.show()

# %% [markdown]
# Which losses count is a separate choice, the step weights of section 4.1: with
# `weights="last"` (Huginn's single loss) only $L_8$ would carry weight, and with truncation
# it always lies inside the differentiated window.

# %% [markdown]
# ### Same values as the model
#
# With no option set, `model(...)` runs exactly as before: the same operations
# in the same order. So the outputs must be *identical*, bit for bit, not merely close. And
# since truncation and checkpointing only change what the backward pass sees, the forward
# values must be identical with them too:

# %% tags=["nbval-check-output"]
reference = model(idx, targets=targets, return_hidden=True)
for knobs in [{}, {"checkpoint": True}, {"grad_steps": 2}, {"grad_steps": 1, "checkpoint": True}]:
    mine = model(idx, targets=targets, return_hidden=True, **knobs)
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
    runner_grads = gradients(model, lambda: loss_of(model(idx, targets, checkpoint=ck)))
    print(f"checkpoint={ck}: max |grad difference| = {max_grad_difference(plain_grads, runner_grads):.1e}")

# %% [markdown]
# The tests pin both properties on a model with a prelude, a 2-block core, a coda and an
# untied head, so that every part of the runner is exercised:

# %% tags=["remove-cell", "nbval-check-output"]
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
full = gradients(model, lambda: model(idx, targets).loss)
for k in (4, 2, 1):
    truncated = gradients(model, lambda: model(idx, targets, grad_steps=k).loss)
    by_hand = gradients(model, lambda: truncated_by_hand(model, idx, targets, 4, k))
    print(f"grad_steps={k}: vs by hand {max_grad_difference(truncated, by_hand):.1e}, "
          f"vs full backprop {max_grad_difference(truncated, full):.1e}")

# %% [markdown]
# With $k = S = 4$ truncation changes nothing. With $k < S$ the gradient matches the by-hand
# version exactly and differs from the full one: the early steps' terms are gone. The test
# also checks the consequence for the *readouts*: with a loss on every step, the losses of
# the no-grad steps contribute no gradient at all.

# %% tags=["remove-cell", "nbval-check-output"]
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
    """Saved-tensor bytes of the model's loss for S = 1..8."""
    return [saved_tensor_bytes(lambda: mem_model(idx_mem, targets_mem, n_loops=int(S), **knobs).loss,
                               params)[0] for S in steps]


def truncated_bytes(**knobs):
    """The same, backpropagating through the last min(2, S) steps."""
    return [saved_tensor_bytes(lambda: mem_model(idx_mem, targets_mem, n_loops=int(S),
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
# `forward` that ignored `checkpoint=True` would pass it. The saved bytes can, so a test
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
        lambda: timing_model(idx_mem, targets_mem, checkpoint=ck).loss, timing_model,
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
    model(idx, targets, n_loops=n_loops).loss.backward()
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
        loss = model(train_data.idx[rows], train_data.targets[rows], n_loops=n_loops).loss
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
    m(batch_idx, batch_targets, n_loops=8).loss.backward()
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
# S \sim \mathrm{Poisson}\big(e^{\tau}\big) + 1, \qquad \sigma = \tfrac12 .
# $$

# %% [markdown]
# The rate $e^\tau$ is log-normal, and the $-\frac12\sigma^2$ makes its mean exactly $\bar r$:
# $\mathbb{E}[e^\tau] = e^{\log \bar r - \sigma^2/2 + \sigma^2/2} = \bar r$. Given the rate, the
# Poisson draw has that mean, so
#
# $$
# \mathbb{E}[S] = \bar r + 1,
# $$
#
# the $+1$ guaranteeing at least one step. (Huginn {cite:p}`geiping2025huginn,huginn-code` draws
# its recurrence $r$, our $S$, this way and calls $\bar r$ the mean recurrence; with
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

# %% tags=["remove-cell", "nbval-check-output"]
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
# up: OpenMythos, a third-party looped transformer, reports in a pull request
# {cite:p}`openmythos-pr80` that at $S \ge 32$ loop steps the norm of the state and the gradients
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
# P_{\text{cons}} = \frac{1}{S-1} \sum_{t=1}^{S-1} \operatorname{mean}_{(b, i) \in \mathcal{M}}\;
# \mathrm{KL}\big(\operatorname{sg}(\pi_S) \,\|\, \pi_t\big),
# $$
#
# with $\operatorname{sg}$ a stop-gradient: the last step is the teacher and is not pulled
# towards the earlier ones. This is self-distillation along depth, the idea of "Be Your Own
# Teacher" {cite:p}`zhang2019byot`, where a network's deepest classifier teaches its
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
# | `grad_steps` | backpropagate through the last $k$ steps only (4.4); with a sampled depth $S < k$, all $S$ |
# | `checkpoint` | activation checkpointing per step (4.4) |
# | `sample_depth` | `None`: the model's `n_loops`; a number $\bar r$: Huginn's sampler per batch (4.6) |
# | `norm_penalty`, `consistency` | weights of the two regularizers above |
# | `scale_core_grad` | scale the core's gradient by $1 / (\text{steps with gradient})$ (4.5) |
#
# The published recipes are settings of these options. Huginn: `sample_depth=r̄, grad_steps=8`
# with the default `"last"` weights. The windowed loss of {cite:t}`yang2024looped` over the last
# $k$ of $S$ steps: `step_weights=[0] * (S - k) + [1] * k, grad_steps=k`. Ouro's stage I (chapter 5)
# weights every step too, by the exit gate's probability of stopping there: weights that are
# learned, per token.

# %% [markdown]
# Two details. The depth sampler has its own random generator, seeded by `seed`, and the loss
# function can save and restore its state (`state_dict`), so that a resumed training run
# draws the same depths as an uninterrupted one. And when only the last readout is used
# (weights `"last"`, no consistency term, no exit gate), the loss asks `forward` for the
# last readout only.

# %% [markdown]
# The core-gradient scaling has to happen during `backward()`, which the `Trainer` calls, not
# the loss function. So the loss function registers a hook on each core parameter
# (`Tensor.register_hook`) that scales the gradient arriving there and then removes itself:
# it acts on exactly one backward pass. A parameter used in $S$ steps receives its summed
# gradient once, so one hook call scales the whole sum.

# %% [markdown]
# Appendix C.1 writes it, `LoopLoss`, with `make_loop_loss(...)` to build one, and tests it
# against the pieces written out by hand.

# %% [markdown]
# One call with everything switched on, to see the metrics it reports:

# %% tags=["nbval-check-output"]
loss_fn = make_loop_loss(step_weights="linear", grad_steps=2, checkpoint=True, sample_depth=4,
                         norm_penalty=0.1, consistency=0.1, scale_core_grad=True, seed=0)
print(loss_fn)
loss, metrics = loss_fn(model, idx, targets)
print({name: round(value, 4) for name, value in metrics.items()})

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
# ## 4.9 Runs that outlast a session
#
# A training run of more than a few minutes needs what this chapter has not built: checkpoint
# files it can resume from, a command line and a benchmark. Appendix C builds them around this
# chapter's loss:
#
# - `save_checkpoint(path, trainer)` and `load_checkpoint(path, get_batch)` write and read
#   everything a `Trainer` needs to continue bit for bit, including the state of a `LoopLoss`
#   that samples depths;
# - `python -m looplm.train` trains on one of chapter 0's tasks with every option of
#   `make_loop_loss` as a flag (`--step-weights`, `--grad-steps`, `--checkpoint-activations`,
#   `--mean-depth`, …), writes `checkpoint.pt`, `metrics.jsonl` and `loss.png`, and resumes with
#   `--resume`;
# - `python -m looplm.bench train` times `LoopLM` against a minimal looped model written in plain
#   PyTorch.
#
# A run from a shell, for example:
#
# ```
# python -m looplm.train --task stack --steps 600 --n-loops 4 --grad-steps 2 --out runs/stack
# ```

# %% [markdown]
# ## 4.10 Bad input gets a clear error
#
# Every function of this chapter checks its arguments and names the one that is wrong. Step
# weights of the wrong length, a truncation longer than the loop, and options that contradict
# each other:

# %% tags=["nbval-check-output"]
for make in (lambda: weighted_step_loss(out.step_losses, targets, [1.0, 1.0, 1.0]),
             lambda: model(idx, targets, n_loops=3, grad_steps=4),
             lambda: make_loop_loss(step_weights=[1, 2, 3, 4], sample_depth=4)):
    try:
        make()
    except ValueError as error:
        print("ValueError:", error)

# %% [markdown]
# The tests pin these messages and the rest of the battery:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
from looplm.backprop import make_loop_loss


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
# | `model(idx, targets, grad_steps=None, checkpoint=False, readout="all")`, `loop_forward(model, idx, ...)` | the one loop's training options (chapter 2's `forward`): truncated backpropagation, per-step activation checkpointing, the last readout only; forward values unchanged |
# | `scale_core_grads(model, factor)` | multiply the core's gradients by `factor` |
# | `sample_depth(mean_steps, sigma=0.5, generator=None)` | Huginn's depth, $\mathrm{Poisson}(e^\tau) + 1$; mean $\bar r + 1$ |
# | `hidden_norm_penalty(hidden)`, `step_consistency(logits, targets)` | the two optional regularizers |
# | `LoopLoss`, `make_loop_loss(step_weights="last", grad_steps=None, checkpoint=False, sample_depth=None, norm_penalty=0.0, consistency=0.0, **options)` | a `loss_fn` for `Trainer` with all of the above; `state_dict()` for exact resumption |
#
# Appendix C builds on it: checkpoints that resume a `LoopLoss` bit for bit, the command line
# `python -m looplm.train` with these options as flags, and `python -m looplm.bench train`.

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
# to read after you have tried. Under each exercise are hints, folded away: open them one at a
# time, and only when you are stuck.

# %% [markdown]
# **Exercise 4.1: Truncated backpropagation** (`ex1_truncated_backprop.py`). Write
# `truncated_logits(model, idx, n_loops, grad_steps)`, which runs a `LoopLM` step by step and
# returns the logits of every step, $[S, B, T, V]$, with the first $S - k$ steps run without
# gradients, as Huginn trains. The tests check the values against the model, the gradients
# against a reference that detaches the state, and that the early readouts carry no gradient.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Section 4.4's loop (chapter 2's `LoopLM.forward`) is made of the model's own methods:
# `rope`, `encode`, `init_state`, `step` and `readout`. Read how it calls them
# (`help(model.step)` shows the arguments) and write the same loop without its options.
# ```

# %% [markdown]
# ````{admonition} Hint 2
# :class: dropdown
# The loop, for $S$ steps:
#
# ```python
# cos, sin = model.rope(idx.shape[1])
# x0 = model.encode(idx, cos, sin)
# h = model.init_state(x0)
# for t in range(S):
#     h = model.step(h, x0, cos, sin)
#     logits_t, _ = model.readout(h, cos, sin)
# ```
#
# Collect the `logits_t` and `torch.stack` them at the end.
# ````

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# Switch autograd off for the first $S - k$ iterations only, around both the step and its
# readout: `with torch.set_grad_enabled(t >= S - k):` does it in one line. Check `grad_steps`
# before anything runs, and remember that `isinstance(True, int)` is true in Python.
# ```

# %% [markdown]
# **Exercise 4.2: The weighted per-step loss** (`ex2_weighted_step_loss.py`). Write
# `weighted_loss(step_losses, targets, weights)`: the normalised weighted average of the
# per-step mean losses of section 4.1, for explicit weights and the three named schemes,
# refusing bad weights. The tests compare with a reference written with loops.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# The learned positions are a boolean mask, `learned = targets != IGNORE_INDEX`, of shape
# $[B, T]$. Indexing with it, `step_losses[:, learned]`, gives an $[S, |\mathcal{M}|]$ tensor of the $|\mathcal{M}|$
# learned positions at every step, whatever the ignored positions hold.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# Turn a name into its list of weights first; then one path handles every case:
# `w = torch.as_tensor(weights, dtype=step_losses.dtype)`, and check its shape, that it is
# finite, that no weight is negative and that the sum is not zero.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# `per_step = step_losses[:, learned].mean(dim=1)` is $[S]$, and the loss is
# `(w * per_step).sum() / w.sum()`. Every operation is differentiable, so the gradient reaches
# `step_losses` at the learned positions only.
# ```

# %% [markdown]
# **Exercise 4.3: The memory of one more step** (`ex3_step_memory.py`). Sections 4.3 and 4.4
# measured what autograd saves for one model at one size. Write
# `extra_step_bytes(config, batch, seq_len, grad_steps=None, checkpoint=False, readout="all", dtype=torch.float32)`,
# which predicts from the arguments alone how many bytes one more loop step adds to what
# `model(idx, targets, ...)` saves for backward, with truncation, checkpointing or both, for either readout
# and in float32, float64 or bfloat16. It refuses the plain loop, whose cost per step depends
# on every operation inside the blocks. The tests measure the real number with
# `saved_tensor_bytes` at $S$ and $S + 1$ steps, on tiny models of several shapes, and compare
# exactly: bytes are integers, so there is no tolerance. Then use it: at Ouro's width and
# vocabulary ($d = 2048$, $V = 49{,}152$) in bfloat16, checkpointed, for 8 sequences of 4096
# tokens, what does one more step cost, which tensor takes most of it, and what does
# `readout="last"` leave?

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Take the two knobs one at a time. With truncation, the extra step runs under `no_grad`, so
# the step itself saves nothing; but its readout's logits still go into the loss. With
# checkpointing, a step keeps only its inputs. Which of `step`'s inputs is a new tensor at
# every step, and which are the same tensors every time?
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# The loss is `token_losses` (chapter 2): read it. It casts the logits to at least float32 and
# calls `F.cross_entropy` on all the steps' logits at once. The backward of cross-entropy needs
# the log-probabilities, and the targets too. Look at what `expand` followed by `reshape` does
# to the targets when there are several steps.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# Per token, one more step adds: under truncation, the readout's log-probabilities ($V$ numbers
# in float32, or float64 for a float64 model) and one int64 target, or nothing with
# `readout="last"`; under checkpointing alone, the same plus the step's input state, $d$ numbers
# in the model's dtype (`torch.empty((), dtype=dtype).element_size()` gives the bytes of one).
# Multiply by `batch * seq_len`. Check it against section 4.4's printed numbers: 178 KiB per
# step checkpointed, 50 KiB truncated, for 16 sequences of 32 tokens, $d = 64$, $V = 23$.
# ```

# %% [markdown]
# The next cell grades your versions. Run it again whenever you like; every test fails until
# you write the code.

# %%
from looplm.grade import grade

report = grade("ch04")
