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
# # Chapter 5: Learning when to stop
#
# A looped model reads out a prediction after every step. So far we always used the last one.
# But a token like the `.` that ends an easy answer may be right after one step, while a
# token deep inside a hard answer may need all of them. This chapter teaches the model to
# decide, token by token, how many steps it needs, and then measures whether the decisions
# are any good.

# %% [markdown]
# The mechanism is Ouro's {cite:p}`zhu2025ouro`. After every step $t$ a small **exit gate** reads
# the state and outputs $\lambda_t \in (0, 1)$, the probability of stopping at step $t$ given
# that the token got that far. The gates of all steps define a distribution $p(t \mid x)$
# over the exit step. Training shapes that distribution in two stages, and at inference a
# simple rule turns it into a step count.
#
# Ouro is not the only answer. Huginn {cite:p}`geiping2025huginn` trains no gate at all and
# stops when the prediction stops changing; this chapter compares its rule with Ouro's.
# Adaptive Computation Time (ACT) {cite:p}`graves2016act` and PonderNet
# {cite:p}`banino2021pondernet` train the same kind of gate with other objectives, and TRM
# {cite:p}`jolicoeurmartineau2025trm` refines an answer in a loop and learns to halt when the
# answer is right: those are chapter 6.

# %% [markdown]
# The plan:
#
# 1. the gate $\lambda_t$ and the exit distribution $p(t \mid x)$;
# 2. Stage I: train model and gate together on the expected loss plus an entropy bonus, see
#    what happens without the bonus, and measure it against the same model without a gate;
# 3. Stage II: freeze the model and train the gate to stop when more steps stop helping;
# 4. exit rules at inference (Q-exit, confidence, KL, hidden-state change, fixed depth),
#    behind one interface that a decoder can call step by step;
# 5. diagnostics: heatmaps, entropy, expected depth, and stability checks;
# 6. three experiments: depth against difficulty, accuracy against compute, and longer inputs
#    against the loop budget, with the threshold chosen on validation data;
# 7. Ouro's two-stage recipe as functions and from the command line (built in Appendix C);
# 8. clear errors for bad input.
#
# The functions go to `looplm/adaptive.py`; the exit rules of section 5.5 are built in Appendix
# C.6, in `looplm/exits.py`.
# The gate itself is registered in `looplm/model.py`. Appendix C holds the machinery around them: the recipe's functions and
# command line, the stability checks, the stored experiment and the tests.

# %% tags=["hide-input"]
import dataclasses
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

import looplm
from looplm.data import (IGNORE_INDEX, TASK_VOCAB, answer_accuracy, encode_examples, make_splits,
                         make_task)
from looplm.adaptive import OBJECTIVES, AdaptiveLoss, GateLoss, Objective, gate_only
from looplm.diagnostics import hidden_norms, step_changes
from looplm.exits import (EXIT_RULES, ConfidenceExit, ExitRule, FixedDepth, HiddenChangeExit, KLExit, QExit,
                          StepView, exit_steps, make_exit_rule, mean_steps, pick_exit_threshold,
                          select_exit_logits, step_view)
from looplm.model import EXIT_GATES, LoopLM, LoopLMConfig
from looplm.testing import run_tests
from looplm.train import RECIPES, Recipe, TrainConfig, Trainer, task_accuracy, task_batches

torch.set_num_threads(1)  # tiny models gain nothing from more threads, and results stay the same
_ = torch.manual_seed(0)  # on machines with different core counts
print("torch", torch.__version__)

# %% [markdown]
# The next cell names the module this chapter's `#| export` cells go to; the one after it
# holds the module's imports.

# %%
#| default_exp adaptive

# %% tags=["hide-input"]
#| export
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from looplm.checks import require_int, require_number
from looplm.data import IGNORE_INDEX, TASK_VOCAB, CharVocab, answer_accuracy
from looplm.model import _exit_distribution
from looplm.diagnostics import hidden_norms, step_changes

# %% [markdown]
# ## 5.1 The exit gate
#
# Ouro's gate is one linear map from the state to a number, squashed by a sigmoid:
#
# $$
# \lambda_t = \sigma\big(w^\top z_t + b\big), \qquad z_t = \mathrm{RMSNorm}(\cdot)\ \text{of step } t .
# $$
#
# $z_t$ is the normed state that the LM head reads (chapter 2's `readout` returns it), so the
# gate sees exactly what the prediction is made from. There is one $\lambda$ per token per
# step: the model's forward stacks them into `out.gate` of shape $[S, B, T]$.

# %% [markdown]
# $\lambda_t$ is a *conditional* probability: the chance of stopping at step $t$ for a token
# that did not stop earlier. Ouro's code builds it with `nn.Linear(hidden, 1)`, bias on. We
# start the weight small (the model's `init_std`) and the bias at zero, so every gate starts
# near $\lambda = \tfrac12$. The sigmoid is taken in float32 so that the products of the next
# section keep their digits under bf16 autocast.
#
# Chapter 2 left a registry for gates, `EXIT_GATES`. An entry is built from the config, maps
# $z$ $[B, T, D]$ to $\lambda$ $[B, T]$, and turns the stacked gates into the exit
# distribution with `exit_probs`. This cell goes to `looplm/model.py`, so a config with
# `exit_gate=True` works as soon as the package is imported:

# %%
#| export model
class LinearExitGate(nn.Module):
    """Ouro's exit gate: λ_t = sigmoid(Linear(d_model, 1)(z_t)), one value per token per step.

    z_t is the normed state the LM head reads. forward(z [B, T, D]) -> λ [B, T] in (0, 1),
    float32 (float64 for a float64 model). exit_probs(gate [S, B, T]) -> p(t | x) [S, B, T] (as looplm.adaptive.exit_distribution).
    """

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.d_model, 1)            # bias on, as in Ouro
        nn.init.normal_(self.proj.weight, mean=0.0, std=config.init_std)
        nn.init.zeros_(self.proj.bias)                      # every gate starts near 1/2

    def forward(self, z):
        logit = self.proj(z)
        return torch.sigmoid(logit.to(torch.promote_types(logit.dtype, torch.float32))).squeeze(-1)   # (B, T)

    def exit_probs(self, gate):
        return _exit_distribution(gate)                      # the model's own gate needs no checks


EXIT_GATES["linear"] = LinearExitGate

# %% [markdown]
# A gated model on the task vocabulary. The gate adds $d + 1$ parameters, and the output
# record now carries `gate` and `exit_probs`:

# %% tags=["nbval-check-output"]
VOCAB_SIZE = TASK_VOCAB.vocab_size
_ = torch.manual_seed(0)
small_config = LoopLMConfig(vocab_size=VOCAB_SIZE, d_model=64, n_heads=4, n_loops=4, exit_gate=True)
gated = LoopLM(small_config)
plain = LoopLM(dataclasses.replace(small_config, exit_gate=False))
print("gate parameters:", sum(p.numel() for p in gated.parameters()) - sum(p.numel() for p in plain.parameters()))
idx = torch.randint(0, VOCAB_SIZE, (2, 6))                   # (B, T)
out = gated(idx)
print("logits", tuple(out.logits.shape), " gate", tuple(out.gate.shape),
      " exit_probs", tuple(out.exit_probs.shape))
print(f"gate at init: min {out.gate.min():.2f}, max {out.gate.max():.2f}")

# %% [markdown]
# ## 5.2 The exit distribution
#
# The gates define when a token stops. It stops at step 1 with probability $\lambda_1$. It
# reaches step 2 with probability $1 - \lambda_1$, and stops there with probability
# $\lambda_2$, and so on. Write $r_t = \prod_{j \le t} (1 - \lambda_j)$ for the probability that
# the token remains after the first $t$ steps ($r_0 = 1$). Ouro's Eq. 3, in this book's notation
# (Ouro writes $T_{\max}$ for the step count $S$ and $S_t$ for $r_t$), is
#
# $$
# p(t \mid x) = \lambda_t\, r_{t-1} \quad (t < S), \qquad
# p(S \mid x) = r_{S-1} .
# $$
#
# The loop has $S$ steps, so a token still running at the last step stops there
# whatever its gate says: the last step takes all the remaining mass, and $\lambda_S$ is
# never used. That is what makes the $p$'s sum to one.

# %% [markdown]
# First the definition as it reads, one token at a time:

# %%
def exit_distribution_slow(gates):
    """p(t | x) for one token from a list of its S gate values, as plain Python floats."""
    probs, survive = [], 1.0
    for t, gate in enumerate(gates):
        if t < len(gates) - 1:
            probs.append(gate * survive)      # stop here, having survived steps 1..t-1
            survive *= 1.0 - gate
        else:
            probs.append(survive)             # the last step takes what is left
    return probs


print(exit_distribution_slow([0.5, 0.5, 0.5, 0.9]))

# %% [markdown]
# By hand: $\tfrac12$, then $\tfrac12 \cdot \tfrac12$, then $\tfrac12 \cdot \tfrac14$, and the
# last step gets the remaining $\tfrac18$; its gate value $0.9$ plays no part.
#
# The tensor version computes the survival products with one `cumprod` over the step
# dimension, for every token at once. It accepts any shape $[S, \dots]$:

# %%
#| export
def _require_steps(name, x, what="the output of a model built with exit_gate=True"):
    """A floating-point tensor [S, ...] with S >= 1; None gets an error saying where it comes from."""
    if x is None:
        raise ValueError(f"{name} is None: it comes from {what}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor [S, ...], got "
                        f"{type(x).__name__}{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have a leading step dimension S >= 1, got shape {list(x.shape)}")
    return x


_NO_GATE = ("a model's exit gate, and this model was built without one: "
            "use LoopLMConfig(..., exit_gate=True)")


def _check_gate(gate):
    _require_steps("gate", gate, _NO_GATE)
    if not torch.isfinite(gate).all():
        raise ValueError("gate holds NaN or inf values")
    if (gate < 0).any() or (gate > 1).any():
        raise ValueError(f"gate values are probabilities and must lie in [0, 1], got min "
                         f"{gate.min().item():.4g} and max {gate.max().item():.4g}")
    return gate

# %% [markdown]
# The validation helpers raise errors that name the tensor and what was wrong with it; a
# gate of `None` gets a message that says how to build a model with one. Checking that every
# gate lies in $[0, 1]$ reads the values, which on a GPU makes the host wait for the device;
# the model's own gate is a sigmoid and needs no check. So the computation is a function of
# `looplm.model`, which `LinearExitGate.exit_probs` calls on every forward, and the public
# `exit_distribution` checks its input and calls it:

# %%
#| export model
def _exit_distribution(gate):
    """exit_distribution without the input checks (for gates a model computed itself)."""
    survive = torch.cumprod(1 - gate[:-1], dim=0)               # S_1 .. S_{S-1}: (S-1, ...)
    reach = torch.cat([torch.ones_like(gate[:1]), survive])      # S_0 .. S_{S-1}: (S, ...)
    return torch.cat([gate[:-1] * reach[:-1], reach[-1:]])        # (S, ...)

# %%
#| export
def exit_distribution(gate):
    """p(t | x) from the exit gates: gate [S, ...] -> [S, ...], summing to 1 over the steps.

    p_t = λ_t ∏_{j<t} (1 − λ_j) for t < S and p_S = ∏_{j<S} (1 − λ_j): the last step takes
    the remaining mass, so the gate of step S is not used (Ouro, Eq. 3).
    """
    return _exit_distribution(_check_gate(gate))

# %% [markdown]
# Checked against the slow version on random gates, token by token, and on the model's own
# output, where `out.exit_probs` must be this function applied to `out.gate`:

# %% tags=["nbval-check-output"]
gates = torch.rand(5, 3, 4, dtype=torch.float64)                 # (S, B, T)
fast = exit_distribution(gates)
slow = torch.tensor([[exit_distribution_slow(gates[:, b, i].tolist()) for i in range(4)]
                     for b in range(3)], dtype=torch.float64).permute(2, 0, 1)
print("matches the slow loop:", torch.allclose(fast, slow, rtol=0, atol=1e-15))
print("sums to 1 over steps:", torch.allclose(fast.sum(0), torch.ones(3, 4, dtype=torch.float64)))
print("out.exit_probs is exit_distribution(out.gate):", torch.equal(out.exit_probs, exit_distribution(out.gate)))

# %% [markdown]
# Two numbers summarise a token's distribution, and we will watch both:
#
# $$
# \mathbb{E}[t] = \sum_{t=1}^{S} t\, p_t , \qquad H(p) = -\sum_{t=1}^{S} p_t \log p_t .
# $$
#
# The **expected depth** says how many steps the token would use on average. The **entropy**
# says how spread the exit is: $0$ when all mass sits on one step, $\log S$ when it is
# uniform ($\log 4 \approx 1.386$ for four steps). We take $0 \log 0 = 0$.

# %%
#| export
def _entropy(probs):
    """-Σ_t p_t log p_t over the first dim, with 0 log 0 = 0 (and finite gradients at 0)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(0)


def exit_entropy(exit_probs):
    """Entropy H(p) of the exit distribution per token: [S, ...] -> [...] (nats)."""
    return _entropy(_require_steps("exit_probs", exit_probs, _NO_GATE))


def expected_depth(exit_probs):
    """Expected exit step Σ_t t p_t per token, steps counted from 1: [S, ...] -> [...]."""
    _require_steps("exit_probs", exit_probs, _NO_GATE)
    steps = torch.arange(1, exit_probs.shape[0] + 1, dtype=exit_probs.dtype, device=exit_probs.device)
    return (exit_probs * steps.view(-1, *[1] * (exit_probs.ndim - 1))).sum(0)

# %% [markdown]
# The hand-made token above, and the untrained model's tokens, whose gates all sit near
# $\tfrac12$ and so put about half their mass on step 1:

# %% tags=["nbval-check-output"]
by_hand = exit_distribution(torch.tensor([0.5, 0.5, 0.5, 0.9]))
print("p =", by_hand.tolist())
print(f"E[t] = {expected_depth(by_hand):.4f} (by hand: 1/2 + 2/4 + 3/8 + 4/8 = 1.875)")
print(f"H(p) = {exit_entropy(by_hand):.4f} (uniform over 4 steps: {math.log(4):.4f})")
print("untrained model, mass per step:", [round(v, 2) for v in out.exit_probs.mean((1, 2)).tolist()])

# %% [markdown]
# ## 5.3 Stage I: the expected loss and an entropy bonus
#
# Each step $t$ has its own loss $L^{(t)}$: the cross-entropy of its readout, which the model
# already returns per token as `out.step_losses` $[S, B, T]$. If a token exits at step $t$
# with probability $p_t$, its **expected loss** is $\sum_t p_t L^{(t)}$. Ouro's Stage I
# minimises that, minus an entropy bonus (Eq. 4):
#
# $$
# \mathcal{L}_{\text{I}} = \sum_{t=1}^{S} p(t \mid x)\, L^{(t)} \;-\; \beta\, H\big(p(\cdot \mid x)\big),
# $$
#
# averaged over the tokens that have a target. The gradient reaches both the model (through
# every $L^{(t)}$) and the gate (through every $p_t$).

# %% [markdown]
# The entropy term has a cleaner reading. For the uniform prior $p_U(t) = 1/S$,
#
# $$
# \mathrm{KL}(p \,\|\, p_U) = \sum_t p_t \log \frac{p_t}{1/S} = -H(p) + \log S ,
# $$
#
# so $\mathcal{L}_{\text{I}} = \sum_t p_t L^{(t)} + \beta\, \mathrm{KL}(p \,\|\, p_U) - \beta \log S$.
# Up to a constant, Stage I is a variational objective (an ELBO) with a uniform prior over the
# exit step: the loss pulls $p$ toward the steps that predict well, and the prior pulls it
# back toward using every step. Ouro picked the uniform prior over geometric or
# Poisson-lognormal ones because those bias the model toward halting early (its Appendix A);
# chapter 6 tries the geometric one. Ouro used $\beta = 0.1$, later $0.05$.

# %% [markdown]
# The slow version, one token at a time, straight from the formula:

# %%
def stage1_loss_slow(step_losses, exit_probs, beta, mask):
    """Eq. 4 with Python loops: [S, B, T] losses and probabilities, [B, T] bool mask."""
    S, B, T = step_losses.shape
    total, count = 0.0, 0
    for b in range(B):
        for i in range(T):
            if not mask[b, i]:
                continue
            p = [exit_probs[t, b, i].item() for t in range(S)]
            expected = sum(p[t] * step_losses[t, b, i].item() for t in range(S))
            entropy = -sum(q * math.log(q) for q in p if q > 0)
            total += expected - beta * entropy
            count += 1
    return total / count

# %% [markdown]
# The tensor version. `mask` marks the tokens that count (a `[B, T]` bool, `None` for all);
# chapter 0's batches give it as `targets != IGNORE_INDEX`. Tokens outside the mask have a
# step loss of zero but an exit distribution all the same, so without the mask their entropy
# would still count.

# %%
#| export
def _check_pair(name_a, a, name_b, b):
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {list(a.shape)} and {name_b} {list(b.shape)} must have the same "
                         f"shape [S, ...] (one value per step per token)")


def _token_mean(values, mask):
    """Mean of per-token values [...] over the tokens where mask [...] is True (all if None)."""
    if mask is None:
        return values.mean()
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (e.g. targets != IGNORE_INDEX), got "
                        f"{type(mask).__name__}{'' if not isinstance(mask, torch.Tensor) else ' of dtype ' + str(mask.dtype)}")
    if mask.shape != values.shape:
        raise ValueError(f"mask {list(mask.shape)} must have the token shape {list(values.shape)} "
                         f"(the step losses' shape without the step dimension)")
    count = mask.sum()
    if count == 0:
        raise ValueError("mask selects no token: there is nothing to average")
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count


def stage1_loss(step_losses, exit_probs, beta, mask=None):
    """Ouro's Stage I loss (Eq. 4): mean over tokens of Σ_t p_t L_t − β H(p).

    step_losses, exit_probs: [S, ...] (per step, per token); beta >= 0; mask: bool [...] of the
    tokens that count (None: all). Gradients reach the step losses and the exit probabilities.
    """
    _require_steps("step_losses", step_losses, "model(idx, targets=...).step_losses")
    _require_steps("exit_probs", exit_probs, _NO_GATE)
    _check_pair("step_losses", step_losses, "exit_probs", exit_probs)
    beta = require_number("beta", beta, low=0)
    expected = (exit_probs * step_losses).sum(0)                # Σ_t p_t L_t: (...)
    return _token_mean(expected - beta * _entropy(exit_probs), mask)

# %% [markdown]
# Both on the untrained model, with a mask that drops some tokens:

# %% tags=["nbval-check-output"]
targets = torch.randint(0, VOCAB_SIZE, (2, 6))
targets[0, :3] = IGNORE_INDEX                                   # e.g. a prompt
out = gated(idx, targets=targets)
mask = targets != IGNORE_INDEX
for beta in (0.0, 0.1):
    fast = stage1_loss(out.step_losses, out.exit_probs, beta, mask).item()
    slow = stage1_loss_slow(out.step_losses, out.exit_probs, beta, mask)
    print(f"beta={beta}: tensor and loop agree to 1e-5: {abs(fast - slow) < 1e-5}")

# %% [markdown]
# The sign of the bonus matters: a larger $\beta$ must make a *spread* distribution cheaper.
# For a uniform $p$ the loss drops by exactly $\beta \log S$ relative to $\beta = 0$; for a
# one-hot $p$ it does not move:

# %% tags=["nbval-check-output"]
losses = torch.tensor([[2.0], [1.0], [0.5], [0.25]])           # (S, tokens)
uniform, one_hot = torch.full((4, 1), 0.25), torch.tensor([[0.0], [0.0], [0.0], [1.0]])
for name, p in (("uniform", uniform), ("one-hot", one_hot)):
    drop = stage1_loss(losses, p, 0.0) - stage1_loss(losses, p, 0.1)
    print(f"{name:8s} loss(beta=0) - loss(beta=0.1) = {drop.item():.4f}")
print(f"0.1 * log 4 = {0.1 * math.log(4):.4f}")

# %% [markdown]
# ### A task that needs depth
#
# To see the gate do something we need a task where some examples need more steps than
# others. Chapter 0's stack task fits: the prompt is a list of pushes (digits) and pops
# (`-`), the answer is the final stack. Tracking which pushes survive gets harder as the
# list grows, and difficulty is the number of operations. We train on difficulties 1 to 5 and
# keep 6 and 7 as the out-of-distribution set. A validation set of 300 more in-distribution
# programs, new to both train and test, is where section 5.7 chooses the exit threshold, so
# that the test set only ever scores:

# %% tags=["nbval-check-output"]
task = make_task("stack")
splits = make_splits(task, n_train=4000, n_test=300, max_difficulty=5, ood_max_difficulty=7, seed=0, n_val=300)
SEQ_LEN = task.max_seq_len(7)                                    # room for the longest OOD example
train_data = encode_examples(splits.train, seq_len=SEQ_LEN)
test_data = encode_examples(splits.test, seq_len=SEQ_LEN)
ood_data = encode_examples(splits.ood, seq_len=SEQ_LEN)
val_data = encode_examples(splits.val, seq_len=SEQ_LEN)
print(splits.train[0], "\n", splits.ood[0])
print("train", tuple(train_data.idx.shape), " test", tuple(test_data.idx.shape), " ood", tuple(ood_data.idx.shape),
      " val", tuple(val_data.idx.shape))

# %% [markdown]
# Training uses chapter 3's `Trainer`, which draws batches with a
# `get_batch(generator) -> (idx, targets)` (chapter 3's `task_batches` makes one from a list
# of examples) and minimises what a `loss_fn(model, idx, targets) -> (loss, metrics)` returns.
#
# Our loss function, `AdaptiveLoss(objective="stage1", beta=..., last_weight=...)`, runs the
# model, applies an objective to the step losses and the gate, and reports a few numbers
# besides the loss: the mean loss of the last step, the mean entropy of $p$ and the mean
# expected depth over the answer tokens, and the mass on each step. `objective` names an entry
# of the registry `OBJECTIVES`, where Stage I is the first and chapter 6 adds three more.
# Appendix C.6 builds both.

# %% [markdown]
# ### Without the bonus, the exit collapses
#
# The model: a one-block core looped four times, width 64, batches of 32, trained with Eq. 4
# from its first update. The first run has no bonus and 300 updates. We print the mass per
# step and the entropy as training goes. Training numbers are measured, not fixed, so these
# cells are not checked by nbval.

# %%
def gated_model(seed=0):
    torch.manual_seed(seed)
    return LoopLM(LoopLMConfig(vocab_size=VOCAB_SIZE, d_model=64, n_heads=4, n_loops=4,
                               exit_gate=True, max_seq_len=SEQ_LEN))


def stage1_config(steps=600, seed=0):
    return TrainConfig(steps=steps, batch_size=32, lr=5e-3, min_lr=5e-4, warmup_steps=50,
                       weight_decay=0.0, eval_every=steps, seed=seed, progress=False)


def train_gated(beta, steps=600, seed=0):
    trainer = Trainer(gated_model(seed), task_batches(splits.train, 32, SEQ_LEN), stage1_config(steps, seed),
                      loss_fn=AdaptiveLoss("stage1", beta=beta))
    trainer.run()
    return trainer


def show_exit_history(trainer, every=150):
    for record in trainer.history:
        if record["step"] % every == 0 or record["step"] == 1:
            mass = " ".join(f"{record[f'mass_{t}']:.3f}" for t in range(1, 5))
            print(f"step {record['step']:4d}  last-step loss {record['last_loss']:.3f}  mass per step [{mass}]"
                  f"  entropy {record['entropy']:.3f}  E[t] {record['depth']:.2f}")

# %%
collapsed = train_gated(beta=0.0, steps=300)
show_exit_history(collapsed)

# %% [markdown]
# With $\beta = 0$ the exit distribution collapses within the first 150 steps and stays
# collapsed: each token's mass sits on **one** step (the mean entropy falls to about 0.17,
# against $\log 4 \approx 1.39$ for a uniform $p$), and for most tokens that step is the
# first.

# %% [markdown]
# Why one step, and why so fast? With $\beta = 0$ the loss is a weighted average of the step
# losses, and the best weighting puts everything on the step with the lowest loss. Early in
# training the steps are about equally bad, and the gate has to pick one; the step with the
# most mass gets the most gradient, so its loss falls fastest, which makes the gate move more
# mass to it. The gate starts near $\lambda = \tfrac12$, which gives step 1 half the mass, so
# here the feedback loop mostly picks step 1. Ouro reports the collapse onto the *last* step
# for its models. Either way, a model whose every token exits at one step has stopped
# learning when to stop.

# %% [markdown]
# Now Ouro's value, $\beta = 0.1$, for 600 updates. This run is part of the stored experiment of
# section 5.7 (three seeds, Appendix B), so instead of training it here we load it; its seed 0
# is exactly the run this cell would make. The same history, every 150 updates:

# %%
from looplm.results import load_results, per_seed, summary

stored = load_results("exit-recipe")
print(stored["command"], "| seeds", stored["seeds"])


def show_stored_history(run, seed=0):
    for record in stored["results"][str(seed)]["runs"][run]["history"]:
        mass = " ".join(f"{record[f'mass_{t}']:.3f}" for t in range(1, 5))
        print(f"step {record['step']:4d}  last-step loss {record['last_loss']:.3f}  mass per step [{mass}]"
              f"  entropy {record['entropy']:.3f}  E[t] {record['depth']:.2f}")


show_stored_history("eq4")

# %% [markdown]
# The bonus keeps the entropy up (1.15 at update 600 in seed 0, against $\log 4 \approx
# 1.39$ for a uniform $p$), and the mass stays on several steps. Note what the bonus costs: at
# the end of training the loss on the answer tokens is small, so $\beta H(p)$, up to
# $0.1 \log 4 \approx 0.14$, is no longer small beside it.
#
# Per-step accuracy on the held-out test set tells the models apart. Chapter 3's
# `task_accuracy` scores every step's readout with chapter 0's exact match: an example counts
# when every answer token is right.

# %%
def per_step_summary(run):
    """Mean ± half-range over the seeds of a stored run's test accuracy after each step."""
    values = per_seed(stored, "runs", run, "test_per_step")
    return [summary([v[t] for v in values]) for t in range(4)]


print("beta = 0, 300 updates (this run)  ", [round(a, 3) for a in task_accuracy(collapsed.model, splits.test).tolist()])
print("beta = 0.1, 600 updates (seed 0)  ", [round(a, 3) for a in stored["results"]["0"]["runs"]["eq4"]["test_per_step"]])
print("beta = 0.1, 3 seeds               ", [f"{s:.3f}" for s in per_step_summary("eq4")])

# %% [markdown]
# ### A baseline without a gate
#
# How good is that? The honest comparison is the same model without a gate, trained on the
# last step's loss alone (chapter 3's default), with the same data, schedule and seeds:

# %%
print("no gate, last-step loss, 3 seeds  ", [f"{s:.3f}" for s in per_step_summary("baseline")])

# %% [markdown]
# The collapsed model reads out its answer at the step where its mass sits, and its other
# readouts were never trained to be good. The model trained with the bonus does not improve
# from step to step either: it is best at step 2 (0.609 ± 0.027 over three seeds) and worse at
# step 4 (0.519 ± 0.057).
#
# The model without a gate reaches 0.813 ± 0.038 at step 4. Its early readouts are poor (0.187
# at step 1), because every bit of its gradient went to step 4; but it uses its four steps.
# The gated model's best step is about 20 points below it. Ouro reports that its gate costs
# little accuracy; here Eq. 4 costs a lot. Is it the gate, or the way Eq. 4 weights the steps?
# One more run separates the two: the same model *without* a gate, trained on fixed weights
# per step equal to where Eq. 4 ended up putting the exit mass in the same seed (chapter 4's
# `make_loop_loss(step_weights=...)`):

# %%
print("Eq. 4's final mass as fixed step weights, no gate:", [f"{s:.3f}" for s in per_step_summary("weights_only")])
print("the weights, seed 0:", [round(w, 3) for w in stored["results"]["0"]["runs"]["weights_only"]["weights"]])

# %% [markdown]
# It falls short the same way: 0.540 ± 0.047 at its best step, 0.499 ± 0.058 at step 4. So the
# gate is not the problem; the weighting is. Eq. 4 weights every step's loss by $p$ from the
# first update, and $p$ starts spread over all four steps (half of it on step 1), so from the
# start most of the gradient asks steps 1 and 2 to produce the answer. The model learns to
# answer early, and does not learn to use its last steps for the harder programs.
#
# ### The recipe: the last step first
#
# The fix keeps both of Ouro's stages and changes when Stage I starts. For the first half of
# Stage I the model trains on its last step alone, exactly the baseline (the gate gets no
# gradient yet); for the second half on an even mix of the two,
#
# $$
# \mathcal{L} = \tfrac12\, L^{(S)} + \tfrac12 \Big(\sum_{t} p(t \mid x)\, L^{(t)} - \beta H\big(p(\cdot \mid x)\big)\Big),
# $$
#
# all on one learning-rate schedule. With `last_weight` $= \alpha$,
# `AdaptiveLoss("stage1", beta, last_weight)` computes $\alpha L^{(S)} + (1 - \alpha)$ Eq. 4;
# `last_weight=1` is the last step alone, and `last_weight=0`
# (the default) is Eq. 4 as printed. Switching the trainer's loss function between two calls
# of `run` keeps its optimizer and schedule:

# %%
recipe = Trainer(gated_model(0), task_batches(splits.train, 32, SEQ_LEN), stage1_config(600, 0),
                 loss_fn=AdaptiveLoss("stage1", beta=0.1, last_weight=1.0))
recipe.run(until=300)
recipe.loss_fn = AdaptiveLoss("stage1", beta=0.1, last_weight=0.5)
recipe.run()
show_exit_history(recipe)
print("test accuracy per step (this run):", [round(a, 3) for a in task_accuracy(recipe.model, splits.test).tolist()])
print("the recipe, 3 seeds:              ", [f"{s:.3f}" for s in per_step_summary("recipe")])

# %% [markdown]
# With the last step learned first, the model keeps what the baseline has: 0.846 ± 0.082 at
# step 4 over three seeds, the baseline's 0.813 ± 0.038 within the seed spread. Its earlier
# readouts are much better than the baseline's (0.520 at step 2 and 0.781 at step 3, against
# 0.380 and 0.687), which is what an exit needs, and the gate moves most of the mass to the
# deep steps (the history above). For its first 300 updates this run *is* the baseline: the
# loss is the last step's, and the gate, which gets no gradient, is the only difference. This
# model is the chapter's Stage I model from here on.

# %%
stage1_model = recipe.model

# %% [markdown]
# ## 5.4 Stage II: stop when more steps stop helping
#
# Stage I teaches the model to predict well at every step, but its gate only learns what the
# entropy bonus lets it. Ouro's Stage II freezes the language model and trains the gate alone,
# with a target built from the losses themselves. For token $i$ and step $t \ge 2$, the
# **improvement** of step $t$ over step $t - 1$ is
#
# $$
# I_i^{(t)} = \max\big(0,\; L_{i}^{(t-1)} - L_{i}^{(t)}\big),
# $$
#
# computed from *detached* losses: they are labels, not something to optimise.

# %% [markdown]
# A soft label turns the improvement into a target for "continue" (Eq. 5):
#
# $$
# \omega_i^{(t)} = \sigma\big(\kappa\,(I_i^{(t)} - \gamma)\big), \qquad \kappa = 50,\; \gamma = 0.005 .
# $$
#
# (Ouro writes $w$ for the label and $k$ for its sharpness $\kappa$, the argument `k` of the
# code.) An improvement well above $\gamma$ gives $\omega \approx 1$: continue. No improvement
# gives $\sigma(-\kappa\gamma) = \sigma(-0.25) \approx 0.44$, a mild vote for stopping. The gate at
# step $t - 1$ predicts "continue" with probability $1 - \lambda_{t-1}$, and the loss is the
# binary cross-entropy between the two, averaged over the learned tokens $\mathcal{M}$ and over
# the steps (Eq. 6):
#
# $$
# L^{(t)} = -\frac{1}{|\mathcal{M}|} \sum_{i \in \mathcal{M}} \Big[ \omega_i^{(t)} \log\big(1 - \lambda_i^{(t-1)}\big)
#           + \big(1 - \omega_i^{(t)}\big) \log \lambda_i^{(t-1)} \Big], \qquad
# \mathcal{L}_{\text{adaptive}} = \frac{1}{S} \sum_{t=2}^{S} L^{(t)} .
# $$
#
# **Where this deviates from the paper.** Ouro's Eq. 6 as printed pairs the label $\omega^{(t)}$
# with $\lambda^{(t)}$, the gate of the *same* step $t$. We pair it with $\lambda^{(t-1)}$.
# The improvement of step $t$ is what continuing past step $t - 1$ buys, so it labels the
# decision the gate makes at step $t - 1$. The pairing also decides which gates learn: ours
# trains $\lambda_1, \dots, \lambda_{S-1}$, exactly the gates that enter $p(t \mid x)$
# (section 5.2: $\lambda_S$ is ignored), while the printed one would train $\lambda_2, \dots,
# \lambda_S$ and leave $\lambda_1$, the gate that decides the cheapest exit, without a Stage II
# signal. Exercise 5.5 works out what each pairing does to a token's exit.

# %% [markdown]
# The slow version, one token at a time:

# %%
def stage2_gate_loss_slow(step_losses, gate, k, gamma, mask):
    """Eq. 5-6 with Python loops: [S, B, T] losses and gates, [B, T] bool mask."""
    S, B, T = step_losses.shape
    total = 0.0
    for t in range(1, S):                                   # steps 2..S, counted from 1
        terms = []
        for b in range(B):
            for i in range(T):
                if mask[b, i]:
                    improvement = max(0.0, step_losses[t - 1, b, i].item() - step_losses[t, b, i].item())
                    w = 1 / (1 + math.exp(-k * (improvement - gamma)))
                    keep_going = 1 - gate[t - 1, b, i].item()
                    terms.append(-(w * math.log(keep_going) + (1 - w) * math.log(1 - keep_going)))
        total += sum(terms) / len(terms)
    return total / S

# %% [markdown]
# The tensor version computes the targets in a function of their own, under `detach`, and
# the cross-entropy by hand in float32 (or float64): PyTorch's `F.binary_cross_entropy` refuses to run
# under autocast. Like PyTorch we clamp each log at $-100$, so a gate of exactly 0 or 1 gives
# a large but finite loss, and we clamp the argument of the log too, so that its gradient
# stays finite: a float32 gate reaches exactly 1 once its logit passes about 17, which a gate
# trained without the entropy bonus does. Stage II needs at least two steps, since there is no improvement
# to measure with one.

# %%
#| export
def _at_least_float32(x):
    """x in float32, or in float64 if it already is (the losses keep their digits)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _safe_log(x):
    """log x clamped at -100 like F.binary_cross_entropy, with a finite gradient at x = 0.

    A float32 gate saturates to exactly 0 or 1 once its logit passes about ±17, and the
    gradient of log at 0 is infinite: clamping the log alone would give 0 * inf = NaN in the
    backward pass. Clamping the argument at the smallest normal number first keeps it finite.
    """
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny)).clamp_min(-100)


def stage2_targets(step_losses, k=50.0, gamma=0.005):
    """Ouro's soft "continue" labels (Eq. 5) for steps 2..S: [S, ...] -> [S-1, ...], no gradient.

    I_t = max(0, L_{t-1} - L_t) on detached losses, w_t = sigmoid(k (I_t - gamma)).
    """
    _require_steps("step_losses", step_losses, "model(idx, targets=...).step_losses")
    k = require_number("k", k, low=0, low_open=True)
    gamma = require_number("gamma", gamma)
    losses = _at_least_float32(step_losses.detach())
    improvement = (losses[:-1] - losses[1:]).clamp_min(0)        # I_t, t = 2..S: (S-1, ...)
    return torch.sigmoid(k * (improvement - gamma))


def stage2_gate_loss(step_losses, gate, k=50.0, gamma=0.005, mask=None):
    """Ouro's Stage II gate loss (Eq. 6): BCE between "continue" = 1 − λ_{t−1} and the label w_t,
    averaged over tokens, summed over t = 2..S, divided by S. Gradient reaches the gate only.

    step_losses, gate: [S, ...] with S >= 2; mask: bool [...] of the tokens that count.
    """
    _require_steps("step_losses", step_losses, "model(idx, targets=...).step_losses")
    _check_gate(gate)
    _check_pair("step_losses", step_losses, "gate", gate)
    n_steps = gate.shape[0]
    if n_steps < 2:
        raise ValueError(f"stage II needs at least 2 steps to measure an improvement, got S={n_steps}")
    targets = stage2_targets(step_losses, k, gamma)               # w_t: (S-1, ...)
    gate = _at_least_float32(gate)
    log_continue = _safe_log(1 - gate[:-1])                      # log(1 - λ_{t-1})
    log_stop = _safe_log(gate[:-1])                              # log λ_{t-1}
    bce = -(targets * log_continue + (1 - targets) * log_stop)    # (S-1, ...)
    per_step = torch.stack([_token_mean(bce[t], mask) for t in range(n_steps - 1)])
    return per_step.sum() / n_steps

# %% [markdown]
# Against the slow loop, on made-up losses and gates:

# %% tags=["nbval-check-output"]
_ = torch.manual_seed(1)
made_up_losses = torch.rand(4, 2, 6, dtype=torch.float64) * 0.3  # (S, B, T)
made_up_gates = torch.rand(4, 2, 6, dtype=torch.float64) * 0.98 + 0.01
for k, gamma in ((50.0, 0.005), (10.0, 0.05)):
    fast = stage2_gate_loss(made_up_losses, made_up_gates, k, gamma, mask).item()
    slow = stage2_gate_loss_slow(made_up_losses, made_up_gates, k, gamma, mask)
    print(f"k={k}, gamma={gamma}: tensor and loop agree to 1e-6: {abs(fast - slow) < 1e-6}")

# %% [markdown]
# And the labels are labels: the loss gives no gradient to the step losses, only to the gate.

# %% tags=["nbval-check-output"]
losses_leaf = made_up_losses.clone().requires_grad_()
gates_leaf = made_up_gates.clone().requires_grad_()
stage2_gate_loss(losses_leaf, gates_leaf).backward()
print("gradient reaches the step losses:", losses_leaf.grad is not None)
print("gradient reaches the gate:", gates_leaf.grad is not None and bool(gates_leaf.grad.abs().sum() > 0))

# %% [markdown]
# ### Training the gate alone
#
# Detaching the labels is not enough to freeze the model: the gate reads $z_t$, and $z_t$ is
# computed by the model, so a gradient of the gate's loss would flow back into the core.
# The Stage II loss function therefore runs the model under `torch.no_grad()`, keeping the
# loop states, and applies the gate to the detached normed states: nothing but the gate can
# get a gradient. `return_hidden=True` gives the states; `readout` turns each into its $z_t$.

# %%
#| export
def gate_on_detached_states(model, idx, targets=None, n_loops=None):
    """model(idx, targets) with the language model under no_grad and the gate recomputed with grad.

    -> LoopOutput whose gate and exit_probs are the only tensors with a graph (to the gate's
    parameters); their values equal model(idx).gate and .exit_probs.
    """
    if getattr(model, "exit_gate", None) is None:
        raise ValueError("this model was built without an exit gate: use LoopLMConfig(..., exit_gate=True)")
    with torch.no_grad():
        out = model(idx, targets=targets, n_loops=n_loops, return_hidden=True)
        cos, sin = model.rope(idx.shape[1])
        states = [model.readout(h, cos, sin)[1] for h in out.hidden]   # z_t: S x (B, T, D)
    out.gate = torch.stack([model.exit_gate(z) for z in states])       # (S, B, T), with grad
    out.exit_probs = model.exit_gate.exit_probs(out.gate)
    return out


# %% [markdown]
# The gates must match the model's own, value for value:

# %% tags=["nbval-check-output"]
check_batch = test_data.idx[:8], test_data.targets[:8]
with torch.no_grad():
    reference = stage1_model(*check_batch[:1])
recomputed = gate_on_detached_states(stage1_model, *check_batch)
print("same gate values as model(idx):", torch.equal(recomputed.gate.detach(), reference.gate))
print("only the gate has a graph:", recomputed.gate.requires_grad and not recomputed.logits.requires_grad)

# %% [markdown]
# The loss function on top, `GateLoss(k, gamma)`, applies `stage2_gate_loss` to that output.
# For good measure the trainer also sees the rest of the model frozen: a small context
# manager, `gate_only(model)`, switches `requires_grad` off for every parameter outside the
# gate and restores it afterwards. Appendix C.6 writes both.

# %% [markdown]
# Stage II on a copy of the Stage I model, 200 steps. The gate has 65 parameters, so this is
# quick; every step still runs the whole model forward to get the labels.

# %%
stage2_model = LoopLM(stage1_model.config)
stage2_model.load_state_dict(stage1_model.state_dict())
stage2_train_config = TrainConfig(steps=200, batch_size=32, lr=1e-2, min_lr=1e-3, warmup_steps=10,
                                  weight_decay=0.0, eval_every=200, seed=1, progress=False)
with gate_only(stage2_model) as trained:
    print("trainable parameters in stage II:", sum(p.numel() for p in trained))
    stage2 = Trainer(stage2_model, task_batches(splits.train, 32, SEQ_LEN), stage2_train_config, loss_fn=GateLoss())
    stage2.run()
show_exit_history(stage2, every=50)

# %% [markdown]
# The language model did not move, only the gate did:

# %% tags=["nbval-check-output"]
before, after = stage1_model.state_dict(), stage2_model.state_dict()
print("LM weights unchanged:", all(torch.equal(before[n], after[n]) for n in before if not n.startswith("exit_gate.")))
print("gate weights changed:", not torch.equal(before["exit_gate.proj.weight"], after["exit_gate.proj.weight"]))

# %% [markdown]
# What did Stage II change? On the test set, before and after it, over the three stored seeds:
# the entropy of $p$, the expected exit step $\mathbb{E}[t]$ and the mass on each step, all
# averaged over the answer tokens.

# %% tags=["nbval-check-output"]
for stage in ("stage1", "stage2"):
    entropy = summary(per_seed(stored, "runs", "recipe", stage, "entropy"))
    depth = summary(per_seed(stored, "runs", "recipe", stage, "depth"))
    mass = [summary([m[t] for m in per_seed(stored, "runs", "recipe", stage, "mass")]) for t in range(4)]
    print(f"after {'Stage I ' if stage == 'stage1' else 'Stage II'}: H(p) {entropy:.2f}   E[t] {depth:.2f}   "
          f"mass [{', '.join(f'{m.mean:.2f}' for m in mass)}]")

# %% [markdown]
# Stage II moved mass from the last step to earlier ones: $\mathbb{E}[t]$ falls from 3.57 to
# 2.89 and the mass on step 4 from 0.68 to 0.41, so the entropy *rises*, from 0.61 to 1.16.
# Stage II does not sharpen $p$; it moves the exit earlier, toward the step after which the loss
# stops falling by $\gamma$. Whether that buys accuracy per step is the question of section
# 5.7.

# %% [markdown]
# ## 5.5 Exit rules at inference
#
# A trained gate gives every token a distribution over its exit step. At inference we need
# one step per token. Ouro's **Q-exit** reads the cumulative distribution,
#
# $$
# \mathrm{CDF}(n) = \sum_{t \le n} p(t \mid x) = 1 - \prod_{j \le n} (1 - \lambda_j) \quad (n < S),
# \qquad t_{\text{exit}} = \min\{\, n : \mathrm{CDF}(n) \ge q \,\},
# $$
#
# and stops at the first step where the token has probably stopped. $q \in (0, 1]$ is set at
# deployment, without retraining: a small $q$ stops early, and $q = 1$ runs every step unless
# a gate is exactly 1. Ouro's paper mentions an optional floor on the step count; we add it as
# `min_steps`. If no step reaches $q$ the token uses all $S$ steps.

# %% [markdown]
# The slow version for one token:

# %%
def q_exit_slow(gates, q, min_steps=1):
    """The Q-exit step (from 1) for one token's list of S gates."""
    cdf = 0.0
    for t, p in enumerate(exit_distribution_slow(gates), start=1):
        cdf += p
        if cdf >= q and t >= min_steps:
            return t
    return len(gates)

# %% [markdown]
# The tensor version takes the `cumsum` of the exit distribution and finds the first step
# where it reaches $q$ with `argmax` (which returns the first of several maxima). Steps come
# back as a LongTensor counted from 1, the convention of the whole book:

# %%
#| export
def _check_q(q):
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or not 0 < q <= 1:
        raise ValueError(f"q must be a number in (0, 1], got {q!r}")
    return float(q)


def q_exit_steps(gate, q, min_steps=1):
    """Ouro's Q-exit: the first step t with CDF_t >= q, never below min_steps, else S.

    gate: [S, ...] exit gates λ; q in (0, 1]; 1 <= min_steps <= S. The CDF is the cumulative sum
    of exit_distribution(gate). -> LongTensor [...] of steps counted from 1.
    """
    _check_gate(gate)
    q = _check_q(q)
    n_steps = gate.shape[0]
    require_int("min_steps", min_steps, 1)
    if min_steps > n_steps:
        raise ValueError(f"min_steps={min_steps} is more than the S={n_steps} steps the gate covers")
    cdf = exit_distribution(gate).cumsum(0)                      # CDF_t: (S, ...)
    reached = cdf >= q
    reached[-1] = True                                            # the last step ends every token
    reached[: min_steps - 1] = False
    return reached.long().argmax(0) + 1                           # first True, counted from 1

# %% [markdown]
# Checks by hand. With every gate at $\tfrac12$ the CDF over four steps is
# $0.5, 0.75, 0.875, 1$:

# %% tags=["nbval-check-output"]
halves = torch.full((4, 1), 0.5)
for q, min_steps in ((0.5, 1), (0.6, 1), (0.75, 1), (0.8, 1), (1.0, 1), (0.5, 3), (0.9, 4)):
    print(f"q={q:4.2f} min_steps={min_steps}: exits at step {q_exit_steps(halves, q, min_steps).item()}"
          f"  (slow: {q_exit_slow([0.5] * 4, q, min_steps)})")
print("q=1 with a gate of exactly 1 at step 2:", q_exit_steps(torch.tensor([[0.2], [1.0], [0.3], [0.5]]), 1.0).item())

# %% [markdown]
# and on random gates against the slow loop, for several $q$ and floors:

# %% tags=["nbval-check-output"]
gates = torch.rand(6, 40, dtype=torch.float64)                   # (S, tokens)
agree = all(q_exit_steps(gates, q, m)[i].item() == q_exit_slow(gates[:, i].tolist(), q, m)
            for q in (0.1, 0.5, 0.9, 1.0) for m in (1, 2, 6) for i in range(40))
print("q_exit_steps matches the slow loop on 480 cases:", agree)

# %% [markdown]
# The rule in a picture, for one made-up token over $S = 6$ steps whose gates rise from 0.05 to
# 0.8. On the left, its exit distribution from `exit_distribution`: the bars are $p(t \mid x)$,
# the dots the gates that made them (the open dot is $\lambda_S$, which plays no part). On the
# right, the running sum of the bars, the CDF, and its complement, the survival
# $r_t = P(\text{exit} > t)$ (for $t < S$ the product of section 5.2). Follow the CDF up to
# the dashed line at $q$: the first step at or above it, marked with a star, is the step
# `q_exit_steps` returns.

# %% tags=["hide-input"]
def plot_q_exit(gate, q):
    """One token's gates [S] -> its exit distribution, CDF and survival, with the Q-exit step."""
    probs = exit_distribution(gate)
    cdf = probs.cumsum(0)
    exit_step = q_exit_steps(gate, q).item()
    n_steps = gate.shape[0]
    steps = torch.arange(1, n_steps + 1)

    fig, (ax_p, ax_c) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_p.bar(steps, probs, color="C0", alpha=0.8, label=r"$p(t \mid x)$")
    ax_p.plot(steps[:-1], gate[:-1], "o", color="C3", label=r"gate $\lambda_t$")
    ax_p.plot(steps[-1:], gate[-1:], "o", markerfacecolor="white", color="C3", label=r"$\lambda_S$, not used")
    ax_p.set(xlabel="step t", ylabel="probability", ylim=(0, 1), xticks=steps.tolist(),
             title="One token's gates and its exit distribution")
    ax_p.legend(loc="upper left")

    ax_c.plot(steps, cdf, "o-", color="C0", label="CDF(t)")
    ax_c.plot(steps, 1 - cdf, "s-", color="C1", label=r"survival $r_t = 1 - \mathrm{CDF}(t)$")
    ax_c.axhline(q, color="gray", linestyle="--", linewidth=1)
    ax_c.text(n_steps + 0.4, q + 0.02, f"q = {q}", color="gray", ha="right", va="bottom")
    ax_c.axvline(exit_step, color="C2", linewidth=1.5, alpha=0.6)
    ax_c.plot(exit_step, cdf[exit_step - 1], "*", color="C2", markersize=14, zorder=3)
    ax_c.text(exit_step + 0.08, 0.03, f"Q-exit: step {exit_step}", color="C2", ha="left", va="bottom")
    ax_c.set(xlabel="step t", ylabel="probability", ylim=(0, 1.05), xlim=(0.6, n_steps + 0.5),
             xticks=steps.tolist(), title=f"The first step where the CDF reaches q = {q}")
    ax_c.legend(loc="upper center")
    plt.tight_layout()
    plt.show()


plot_q_exit(torch.tensor([0.05, 0.1, 0.2, 0.35, 0.5, 0.8], dtype=torch.float64), q=0.5)

# %% [markdown]
# The CDF reaches 0.32 at step 3 and 0.56 at step 4, so $q = 0.5$ stops this token after four
# of its six steps. A smaller $q$ moves the star to the left, a larger one to the right, and
# the last step ends every token: the survival there is 0, whatever $\lambda_S$ says.

# %% [markdown]
# ### One interface for every rule
#
# Q-exit needs a gate. Other rules need none and look at the predictions or the states
# instead:
#
# - **confidence**: stop when the top next-token probability reaches a threshold,
#   $\max_v \pi_t(v) \ge \pi_{\min}$, where $\pi_t$ is step $t$'s next-token distribution
#   ({cite:t}`fan2025looped` halt at the most confident step);
# - **KL**: stop when the prediction stops changing,
#   $\mathrm{KL}(\pi_t \,\|\, \pi_{t-1}) < \varepsilon$; Huginn uses $\varepsilon = 5 \times 10^{-4}$
#   with no trained gate at all;
# - **hidden-state change**: stop when the state stops moving,
#   $\lVert h_t - h_{t-1} \rVert / \lVert h_{t-1} \rVert < \varepsilon$ (Huginn's code has it
#   with $0.03$; Ouro reports it within 1 to 2 points of its gate on MMLU);
# - **fixed depth**: stop at step $n$, for comparison.

# %% [markdown]
# A decoder (chapter 7) runs the loop one step at a time, and a rule must decide after each
# step with only what has been computed so far. So a rule is an object with one method that
# sees a **view** of step $t$: its readout, the previous readout, the gates so far, the state
# and the previous state. Each rule reduces the view to a **score** per token and compares it
# with its threshold. Scores that need a previous step are $+\infty$ at step 1, so those rules
# never stop a token there.

# %% [markdown]
# Appendix C.6 writes this interface in `looplm/exits.py`: a `StepView`; an `ExitRule`, whose
# `score(view)` gives each token's score and `stop(view)` compares it with the threshold
# from `min_steps` on; the five rules, `QExit`, `ConfidenceExit`, `KLExit`,
# `HiddenChangeExit` and `FixedDepth`, each a few lines with its default threshold ($q = 0.5$,
# top probability $0.9$, a KL of $5 \cdot 10^{-4}$, a relative change of $0.03$, depth $2$);
# and `make_exit_rule(name, threshold)`, which builds one by name.

# %% [markdown]
# A step-by-step decoder calls `rule.stop(view)` after each step and freezes the tokens that
# stop. For a whole forward pass, where all $S$ steps were computed anyway, `exit_steps` (also
# in Appendix C.6) does the same walk over the stored steps. It takes a `LoopOutput` (or the
# tensors by name) and returns the step each token stops at.
#
# **Per token or per sequence.** Per token, each token stops on its own. Per sequence, all
# tokens of a row stop together, in one of two ways (the `reduce` argument):
#
# - `"all"`: a sequence stops when its last token stops, so its step is the largest of its
#   tokens' steps. This is how Huginn's batched generation waits for every sequence.
# - `"mean"`: a sequence stops at the first step where the *mean* score of its tokens passes
#   the threshold.
#
# Only tokens in `mask` count for a sequence (the answer tokens, say); the returned steps are
# still one per token, $[B, T]$, equal along each row.

# %% [markdown]
# The Q-exit rule walked step by step must agree with `q_exit_steps` exactly, because it
# computes the same sums in the same order:

# %% tags=["nbval-check-output"]
gates = torch.rand(5, 3, 7)                                       # (S, B, T)
print("QExit via exit_steps == q_exit_steps:",
      all(torch.equal(exit_steps(QExit(q, m), gate=gates), q_exit_steps(gates, q, m))
          for q in (0.2, 0.5, 0.95, 1.0) for m in (1, 3)))

# %% [markdown]
# The other rules get the same kind of check against hand-written loops in the tests at the
# end of the section. Here is each rule on one made-up token whose prediction settles:
# three readouts over a vocabulary of 3, growing more confident and then not moving.

# %% tags=["nbval-check-output"]
token_logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [4.0, 0.0, 0.0], [4.0, 0.01, 0.0]])
token_logits = token_logits[:, None, :]                            # (S, tokens=1, V)
for rule in (ConfidenceExit(0.9), KLExit(5e-4), KLExit(0.2), FixedDepth(2)):
    view_scores = [round(rule.score(step_view(t, logits=token_logits)).item(), 4) for t in range(1, 5)]
    print(f"{str(rule):40s} scores {view_scores} -> step {exit_steps(rule, logits=token_logits).item()}")

# %% [markdown]
# Confidence passes 0.9 at step 3 (softmax of $(4, 0, 0)$ puts 0.965 on the first token).
# The KL between steps 3 and 4 is tiny, so Huginn's threshold stops at step 4, while a loose
# threshold of 0.2 already stops at step 3. Fixed depth ignores the logits.

# %% [markdown]
# Once every token has a step, `select_exit_logits` gathers each token's readout from the
# step it stopped at, $[S, B, T, V] \to [B, T, V]$. This is how the exit is applied in this
# chapter: all $S$ steps are computed and the exit only chooses which readout a token reports.
# Ouro's released code does the same. Skipping the computation for real, with a KV cache, is
# chapter 7's job.

# %% [markdown]
# The trained model, every rule at a moderate setting, on the test set. A token's step counts
# only where it has a target, so the averages are over answer tokens:

# %%
with torch.no_grad():
    test_out = stage2_model(test_data.idx, targets=test_data.targets, return_hidden=True)
answer_mask = test_data.targets != IGNORE_INDEX                  # (B, T)
for rule in (QExit(0.5), ConfidenceExit(0.9), KLExit(0.1), HiddenChangeExit(0.5), FixedDepth(4)):
    steps = exit_steps(rule, test_out)                            # (B, T)
    accuracy = answer_accuracy(select_exit_logits(test_out.logits, steps), test_data.targets).float().mean()
    print(f"{str(rule):40s} mean steps {mean_steps(steps, answer_mask):.2f}   accuracy {accuracy:.3f}")

# %% [markdown]
# Per sequence, with the answer tokens as the mask: waiting for every token (`"all"`) can only
# use more steps than the per-token rule; the mean score can land on either side.

# %%
for per, reduce in (("token", "all"), ("sequence", "all"), ("sequence", "mean")):
    steps = exit_steps(QExit(0.5), test_out, per=per, reduce=reduce, mask=answer_mask)
    accuracy = answer_accuracy(select_exit_logits(test_out.logits, steps), test_data.targets).float().mean()
    print(f"per={per:8s} reduce={reduce:4s}: mean steps {mean_steps(steps, answer_mask):.2f}   accuracy {accuracy:.3f}")

# %% [markdown]
# Appendix C tests the gate, both losses and every rule against slow loops written from their
# definitions, and pins the hand-computed values of this chapter.

# %% [markdown]
# ## 5.6 Diagnostics
#
# ### Where the steps go
#
# A **heatmap** of exit steps shows at a glance which tokens the model thinks are hard. Each
# row is a test example and each cell an answer position, labelled with the character it
# predicts (`.` ends the answer); the colour is the Q-exit step at $q = 0.5$. The right panel
# shows the expected depth $\mathbb{E}[t]$ of the same tokens.

# %%
def exit_heatmap(out, data, rows, q=0.5):
    mask = data.targets[rows] != IGNORE_INDEX                           # (R, T)
    steps = q_exit_steps(out.gate[:, rows], q).float()                 # (R, T)
    depth = expected_depth(out.exit_probs[:, rows])                     # (R, T)
    first = int(mask.float().argmax(1).min())                           # skip prompt-only columns
    n_steps = out.gate.shape[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.42 * len(rows) + 1.4))
    for ax, values, title in ((axes[0], steps, f"Q-exit step (q = {q})"), (axes[1], depth, "expected depth E[t]")):
        shown = values.masked_fill(~mask, float("nan"))[:, first:]
        image = ax.imshow(shown, cmap="viridis", vmin=1, vmax=n_steps, aspect="auto")
        for r in range(len(rows)):
            for c in range(first, mask.shape[1]):
                if mask[r, c]:
                    ax.text(c - first, r, TASK_VOCAB.chars[data.targets[rows[r], c]], ha="center",
                            va="center", color="white" if values[r, c] < (n_steps + 1) / 2 else "black")
        labels = [f"{splits.test[i].prompt} (d={splits.test[i].difficulty})" for i in rows]
        ax.set(yticks=range(len(rows)), yticklabels=labels, xticks=[], title=title)
        fig.colorbar(image, ax=ax, fraction=0.04)
    plt.tight_layout()
    plt.show()


order = sorted(range(len(splits.test)), key=lambda i: (splits.test[i].difficulty, i))
rows = [order[int(f * (len(order) - 1))] for f in torch.linspace(0, 1, 10).tolist()]
exit_heatmap(test_out, test_data, rows)

# %% [markdown]
# Reading it: each prompt is a list of pushes and pops, and the cells are the final stack,
# bottom to top, then `.`. The rows go from the easiest examples to the hardest. Averaged over
# the whole test set, by the token's place in the answer:

# %%
def steps_by_answer_position(out, data, q=0.5):
    steps = q_exit_steps(out.gate, q)                                   # (B, T)
    mask = data.targets != IGNORE_INDEX
    first = mask & ~torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], 1)   # first answer token
    end = mask & (data.targets == TASK_VOCAB.eos_id)                    # the end token "."
    middle = mask & ~first & ~end
    for name, where in (("first answer token", first & ~end), ("later answer tokens", middle),
                        ("end token '.'", end)):
        print(f"{name:20s} {where.sum().item():4d} tokens, mean Q-exit step {mean_steps(steps, where):.2f}")


steps_by_answer_position(test_out, test_data)

# %% [markdown]
# ### Stability checks
#
# A looped model can fail quietly: a state that grows step by step until it overflows, an
# exit distribution that no longer sums to one because of a NaN in one gate, a loop that
# never settles. The checks below are cheap enough to run on every evaluation batch.
#
# Chapter 3's `looplm.diagnostics` already measures the states: `hidden_norms` (the RMS of
# each state, per token) and `step_changes` ($\lVert h_t - h_{t-1} \rVert / \lVert h_{t-1}
# \rVert$, per token). The new check is for the exit distribution. It returns what it
# measured, or raises an error that says what is wrong:

# %% [markdown]
# `check_exit_probs(exit_probs)` raises unless the distribution is finite, non-negative and
# sums to one; `stability_report(out)` runs every check on one output record: finite logits and
# losses, a proper exit distribution, finite and bounded states, and the **trend** of the
# state changes, informational only (a loop whose changes shrink is settling toward a fixed
# point, as {cite:t}`yang2024looped` observe; one whose changes grow is heading for trouble; a loop may keep
# moving and still be useful). Appendix C builds both.

# %%
from looplm.adaptive import check_exit_probs, stability_report

# %% [markdown]
# The trained model's report on the test set:

# %%
print(stability_report(test_out))

# %% [markdown]
# And a broken output, to see the failures. We poison one gate with a NaN and scale the
# states up, on a copy of the record:

# %% tags=["nbval-check-output"]
broken = dataclasses.replace(test_out, gate=test_out.gate.clone(), hidden=test_out.hidden * 1e4)
broken.gate[2, 0, 5] = float("nan")
broken.exit_probs = torch.cat([broken.gate[:-1], 1 - broken.gate[:-1].sum(0, keepdim=True)])
report = stability_report(broken)
print("report ok:", report.ok)
try:
    report.raise_if_failed()
except ValueError as e:
    print("ValueError:", str(e)[:160], "...")

# %% [markdown]
# ## 5.7 Experiments
#
# Three questions: does the model spend more steps on harder examples, which exit rule buys
# the most accuracy per step, and do more steps help on inputs longer than any seen in
# training? Each is answered twice: on the models trained above (seed 0), with plots, and over
# three seeds from stored results (Appendix B), which is what the conclusions rest on. One
# seed of these small models can move by several points.
#
# The experiment trains, for each seed, the four models section 5.3 compared: the baseline
# without a gate, Eq. 4 from the first update, the same step weights without a gate, and the
# recipe, each with the same data and schedule, plus Stage II for the two gated ones. It then
# runs every measurement of this section on them. Its code is the chapter's, packaged as
# functions of the seed:

# %% [markdown]
# The stored experiment `exit-recipe` (defined in Appendix C, run with
# `python -m looplm.results run exit-recipe`) trains, for each of three seeds, the baseline
# without a gate, Eq. 4 from the first update, the same step weights without a gate, and the
# recipe of section 5.8, on the splits of this chapter with a validation set of 300 examples,
# and records everything the tables below read.

# %% [markdown]
# ### The threshold to deploy, and what it costs
#
# Q-exit needs a threshold $q$. We choose it on the validation set, never on the test set:
# `pick_exit_threshold` scores every $q$ of a grid there and takes, among those within one
# point of the best accuracy, the one with the fewest mean steps. Then the test set scores
# that single choice. For the model trained above:

# %%
chosen_q, val_table = pick_exit_threshold(stage2_model, val_data)
print("validation:", " ".join(f"q={q}: {a:.3f} @ {n:.2f}" for q, a, n in val_table))
test_steps = q_exit_steps(test_out.gate, chosen_q)
test_accuracy = answer_accuracy(select_exit_logits(test_out.logits, test_steps), test_data.targets).float().mean()
print(f"chosen q = {chosen_q}: test accuracy {test_accuracy:.3f} at {mean_steps(test_steps, answer_mask):.2f} "
      f"steps per answer token")

# %% [markdown]
# And over the three seeds, against the baseline without a gate, and against the same gated
# model run to full depth:

# %% tags=["nbval-check-output"]
baseline_last = summary([v[3] for v in per_seed(stored, "runs", "baseline", "test_per_step")])
print(f"{'model':30s} {'gate':9s} {'q (per seed)':>16s} {'test accuracy':>14s} {'steps/token':>12s}")
for label, run in (("Eq. 4 from the first update", "eq4"), ("the recipe", "recipe")):
    for stage in ("stage1", "stage2"):
        accuracy = summary(per_seed(stored, "runs", run, stage, "q_accuracy"))
        steps = summary(per_seed(stored, "runs", run, stage, "q_steps"))
        qs = ", ".join(str(q) for q in per_seed(stored, "runs", run, stage, "q"))
        gate = "Stage I" if stage == "stage1" else "Stage II"
        print(f"{label:30s} {gate:9s} {qs:>16s} {accuracy:14.3f} {steps:12.2f}")
    print(f"{label:30s} {'(none)':9s} {'4 steps':>16s} "
          f"{summary([v[3] for v in per_seed(stored, 'runs', run, 'test_per_step')]):14.3f} {4:12.2f}")
print(f"{'no gate, last-step loss':30s} {'':9s} {'4 steps':>16s} {baseline_last:14.3f} {4:12.2f}")

# %% [markdown]
# At the threshold chosen on validation, the recipe's two-stage model scores 0.839 ± 0.080 on
# the test set with 3.26 ± 0.07 steps per answer token, against 0.813 ± 0.038 for the model
# without a gate at 4 steps: as accurate, seed by seed within a few points either way, with
# about three quarters of a step fewer per token. Ouro's finding, that the gate costs little
# accuracy, holds here once the last step is learned first. Eq. 4 from the first update, with
# the same Stage II, exits much earlier (1.83 steps) and is about 20 points worse. And the Stage I
# gate alone, at its own chosen $q$, does as well as the Stage II gate (0.837 ± 0.080 at 3.16
# steps): on this task Stage II moved the exit mass without buying accuracy per step.

# %% [markdown]
# ### Depth against difficulty
#
# For each difficulty from 1 to 7 we draw 200 fresh examples (those of difficulty up to 5 may
# repeat training prompts; 6 and 7 were never trained on), apply Q-exit at $q = 0.5$ to the
# Stage I and the Stage II gate, and average the steps over each example's answer tokens.

# %%
def steps_per_example(out, data, q=0.5):
    """Mean Q-exit step over each example's answer tokens, and whether its exit answer is right."""
    mask = data.targets != IGNORE_INDEX
    steps = q_exit_steps(out.gate, q)                                   # (B, T)
    per_example = (steps * mask).sum(1) / mask.sum(1)                   # (B,)
    correct = answer_accuracy(select_exit_logits(out.logits, steps), data.targets)
    return per_example, correct


depth_rows = []
for difficulty in range(1, 8):
    data = encode_examples(task.sample(200, difficulty, seed=f"depth/{difficulty}"), seq_len=SEQ_LEN)
    with torch.no_grad():
        steps_1, _ = steps_per_example(stage1_model(data.idx), data)
        steps_2, correct = steps_per_example(stage2_model(data.idx), data)
    depth_rows.append((difficulty, steps_1, steps_2, correct))
    print(f"difficulty {difficulty}: mean steps  Stage I gate {steps_1.mean():.2f}   Stage II gate "
          f"{steps_2.mean():.2f}   accuracy at exit {correct.float().mean():.2f}")

# %% [markdown]
# The correlation between an example's difficulty and its steps, over all 1,400 examples
# (Pearson's correlation coefficient; 0 would mean the gate ignores difficulty):

# %%
def pearson(x, y):
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return ((x * y).sum() / (x.norm() * y.norm())).item()


difficulties = torch.cat([torch.full((len(r[1]),), r[0]) for r in depth_rows])
for name, column in (("Stage I gate ", 1), ("Stage II gate", 2)):
    print(f"{name}: r(difficulty, steps) = {pearson(difficulties, torch.cat([r[column] for r in depth_rows])):.2f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.6))
for name, column, marker in (("Stage I gate", 1, "o"), ("Stage II gate", 2, "s")):
    ax.plot([r[0] for r in depth_rows], [r[column].mean() for r in depth_rows], marker=marker, label=name)
ax.axvspan(5.5, 7.5, color="gray", alpha=0.15, label="longer than training")
ax.set(xlabel="difficulty (stack operations)", ylabel="mean Q-exit step (q = 0.5)",
       title="Steps used against difficulty", ylim=(1, 4))
ax.legend()
plt.show()

# %% [markdown]
# Over the three seeds (mean ± half-range of the mean steps per example, and of the accuracy at
# the Stage II gate's exit):

# %% tags=["nbval-check-output"]
print(f"{'difficulty':>10s} {'Stage I gate':>15s} {'Stage II gate':>15s} {'accuracy':>15s}")
rows = per_seed(stored, "runs", "recipe", "difficulty")
for d in range(7):
    cells = [summary([seed_rows[d][key] for seed_rows in rows])
             for key in ("stage1_steps", "stage2_steps", "stage2_accuracy")]
    print(f"{d + 1:10d} {cells[0]:15.2f} {cells[1]:15.2f} {cells[2]:15.2f}")

# %% [markdown]
# Over three seeds both gates spend more steps on harder programs, but only a little more: the
# Stage II gate's mean rises from 2.50 ± 0.09 steps at difficulty 1 to 2.80 ± 0.11 at
# difficulty 5, the Stage I gate's from 3.11 to 3.47. In seed 0 the correlation between an
# example's difficulty and its steps is weak (the coefficient printed above). Stage II lowers the
# steps at every difficulty, by 0.6 to 0.9 of a step: its labels say that a step which no
# longer lowers the loss by $\gamma$ is not worth taking. The accuracy at the exit falls from
# 1.00 at difficulty 1 to 0.85 at difficulty 5, and to about 0.2 on the longer programs (6
# and 7), which get no more steps than difficulty 5: the gate learned how deep the training
# programs go, not to give unseen lengths more.

# %% [markdown]
# ### Accuracy against compute
#
# On the test set, one model (the Stage II model) and every rule. Each rule's threshold is
# swept from "stop at once" to "never stop", and every setting gives one point: the mean
# number of steps used per answer token, and the exact-match accuracy of the readouts chosen.
# The Stage I model has the same language model and differs only in its gate, so its Q-exit
# curve shows what Stage II changed. Figure 5 of {cite:t}`zhu2025ouro` is this plot for MMLU.

# %%
from looplm.experiments import CH05_BUDGETS, best_at_budgets, ch05_rules, rule_curves

with torch.no_grad():
    stage1_test_out = stage1_model(test_data.idx, return_hidden=True)
for name, (which, rules) in ch05_rules().items():
    print(f"{name:22s} ({which} gate): {', '.join(str(rule) for rule in rules[:3])}, ...")
curves = rule_curves({"stage1": stage1_test_out, "stage2": test_out}, test_data.targets)

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
for (name, points), marker in zip(curves.items(), "os^vDx"):
    ax.plot(*zip(*points), marker=marker, markersize=4, label=name)
ax.set(xlabel="mean steps per answer token", ylabel="test exact match",
       title="Accuracy against compute, one model, six exit rules")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The same curves as numbers: the best accuracy each rule reaches with at most 1.5, 2 and 2.5
# steps per token on average, and with no limit. First this model (seed 0), then the mean ±
# half-range over the three stored seeds ("—": no setting of the rule is that cheap, in some
# seed).

# %%
def budget_row(values):
    return " ".join(f"{'—':>7s}" if v is None else f"{v:7.3f}" for v in values)


print(f"{'rule':22s} {'<= 1.5':>7s} {'<= 2.0':>7s} {'<= 2.5':>7s} {'any':>7s}   (seed 0, this run)")
for name, points in curves.items():
    print(f"{name:22s} {budget_row(best_at_budgets(points))}")

# %% tags=["nbval-check-output"]
print(f"{'rule':22s} {'<= 1.5':>15s} {'<= 2.0':>15s} {'<= 2.5':>15s} {'any':>15s}   (3 seeds)")
for name in ch05_rules():
    columns = list(zip(*per_seed(stored, "runs", "recipe", "budgets", name)))        # one tuple per budget
    cells = [f"{'—':>15s}" if None in column else f"{summary(column):15.3f}" for column in columns]
    print(f"{name:22s} {' '.join(cells)}")
baseline_last = summary([v[3] for v in per_seed(stored, "runs", "baseline", "test_per_step")])
print(f"{'baseline, no gate':22s} {'':47s} {baseline_last:15.3f}   (4 steps)")

# %% [markdown]
# Every rule reaches full-depth accuracy (0.846 ± 0.082) when it may use all four steps, so the
# question is what each buys below that. With at most 2.5 steps per token, Q-exit with the
# Stage II gate has the highest mean (0.641 ± 0.072), ahead of KL (0.597), hidden-state change
# (0.558), confidence (0.539) and fixed depth (0.520), but not in every seed: in one, KL
# matches it and confidence beats it. With at most 2 steps, fixed depth 2 is ahead on average
# (0.520 against 0.398 for Q-exit), though not in every seed. Below about three steps every rule
# is far under full depth: the harder answers on this task need a third step, and no rule finds
# a shortcut around it. The Stage I gate has no setting that cheap at all (its cheapest
# setting uses more than 2.5 steps per token): Stage II's earlier exits are what make the small
# budgets reachable. KL and hidden-state change compare a step with the one before, so they
# never stop a token at step 1 and their curves start at 2 steps.

# %% [markdown]
# ### Longer inputs against the loop budget
#
# The out-of-distribution set holds stacks of 6 and 7 operations, longer than any training
# example. Can a looped model spend extra steps on them? We run the Stage II model with
# budgets of 1 to 8 steps (it was trained with 4) and read out either the last step (fixed
# depth) or the Q-exit step within the budget.

# %%
budget_rows = []
for n_loops in range(1, 9):
    row = [n_loops]
    for data in (test_data, ood_data):
        with torch.no_grad():
            record = stage2_model(data.idx, n_loops=n_loops)
        steps = q_exit_steps(record.gate, 0.5)
        row += [answer_accuracy(record.logits[-1], data.targets).float().mean().item(),
                answer_accuracy(select_exit_logits(record.logits, steps), data.targets).float().mean().item(),
                mean_steps(steps, data.targets != IGNORE_INDEX)]
    budget_rows.append(row)
print("budget | test: last step  Q-exit (steps) | OOD: last step  Q-exit (steps)   (seed 0, this run)")
for n, a, b, s, c, d, u in budget_rows:
    print(f"{n:6d} |       {a:.3f}      {b:.3f} ({s:.2f}) |      {c:.3f}      {d:.3f} ({u:.2f})")

# %% tags=["nbval-check-output"]
print(f"{'budget':>6s} {'test, last':>14s} {'test, Q-exit':>14s} {'OOD, last':>14s} {'OOD, Q-exit':>14s}   (3 seeds)")
rows = per_seed(stored, "runs", "recipe", "loop_budget")
for n in range(8):
    cells = [summary([seed_rows[n][key] for seed_rows in rows]) for key in ("test_last", "test_qexit", "ood_last", "ood_qexit")]
    print(f"{n + 1:6d} " + " ".join(f"{c:14.3f}" for c in cells))

# %%
fig, ax = plt.subplots(figsize=(6, 3.6))
budgets = [r[0] for r in budget_rows]
ax.plot(budgets, [r[1] for r in budget_rows], "o-", color="C0", label="test, last step")
ax.plot(budgets, [r[2] for r in budget_rows], "o--", color="C0", label="test, Q-exit")
ax.plot(budgets, [r[4] for r in budget_rows], "s-", color="C1", label="OOD (longer), last step")
ax.plot(budgets, [r[5] for r in budget_rows], "s--", color="C1", label="OOD (longer), Q-exit")
ax.axvline(4, color="gray", linewidth=1, linestyle=":")
ax.text(4.1, 0.02, "trained with 4 steps", color="gray", fontsize=8)
ax.set(xlabel="loop budget (steps run)", ylabel="exact match", ylim=(0, 1),
       title="Accuracy against the loop budget")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Past the trained depth the last step gets worse: 0.846 ± 0.082 at 4 steps, 0.800 at 5 and
# 0.349 ± 0.162 at 8. Q-exit holds at 0.807 ± 0.073 for every budget of 5 or more: the gate
# stops almost every token by step 4, so a larger budget goes unused (about 3.2 steps per
# token). On the longer programs neither helps: 0.21 at 4 steps, and about 0.20 with Q-exit
# at any budget. A gate trained with 4 steps learned how deep the training inputs need to go;
# it does not turn extra budget into accuracy on harder inputs. Training for depth
# extrapolation is a separate matter (chapter 4's randomized depth is one lever).

# %% [markdown]
# ## 5.8 Ouro's two stages as a recipe
#
# The chapter trained Stage I and Stage II by hand. Three functions package the recipe for
# any `get_batch`, in `looplm/train/__init__.py` beside the Trainer (Appendix C builds them):
#
# - `train_stage1` trains model and gate together: `warm_steps` updates on the last step's
#   loss alone, then the rest of `config.steps` on `AdaptiveLoss("stage1", beta, last_weight)`,
#   all on one learning-rate schedule (section 5.3's recipe; `warm_steps=0, last_weight=0` is
#   Eq. 4 from the first update, as Ouro prints it);
# - `train_stage2` freezes everything but the gate and trains it with `GateLoss`;
# - `train_two_stage` runs both: Stage I for `config.steps - stage2_steps` updates (warming up
#   on the last step for half of them unless told otherwise), then Stage II for `stage2_steps`
#   on its own schedule (peak `stage2_lr`, a tenth of it at the end) and its own batch seed.
#   It returns the Stage II trainer, whose history holds the rows of both stages, marked
#   `stage` 1 or 2 and numbered through both.

# %%
from looplm.train import train_stage1, train_stage2, train_two_stage

# %% [markdown]
# A short run, to see the two stages in the history: 30 updates of Stage I, then 10 of
# Stage II. Only the gate changes in the second stage.

# %% tags=["nbval-check-output"]
torch.manual_seed(0)
recipe_model = LoopLM(LoopLMConfig(vocab_size=VOCAB_SIZE, d_model=32, n_heads=4, n_loops=3,
                                   exit_gate=True, max_seq_len=SEQ_LEN))
recipe_config = TrainConfig(steps=40, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=5,
                            eval_every=0, progress=False)
recipe = train_two_stage(recipe_model, task_batches(splits.train, 16, SEQ_LEN), recipe_config, stage2_steps=10)
print("rows per stage:", {s: sum(r["stage"] == s for r in recipe.history) for s in (1, 2)},
      " last step:", recipe.history[-1]["step"])
print("all parameters trainable again:", all(p.requires_grad for p in recipe_model.parameters()))

# %% [markdown]
# ### From the command line
#
# The training command line, `python -m looplm.train` (Appendix C), selects a training recipe
# with `--recipe NAME` from the registry `RECIPES`, and Appendix C adds `"two-stage"`. Its options: the share
# of Stage II (`--stage2-steps`, a fifth of `--steps` by default), the entropy weight `--beta`,
# Stage I's `--warm-steps` (half of Stage I by default) and `--last-weight` (0.5), and Stage
# II's `--stage2-k`, `--stage2-gamma` and `--stage2-lr`. `--warm-steps 0 --last-weight 0` is
# Ouro's Eq. 4 from the first update. The command line builds its
# model from its own options; if that model has no gate, the recipe adds one (a fresh gate,
# with every other weight kept).

# %% [markdown]
# A short run on the stack task, with the output in a temporary folder. From a shell it is the
# `python -m looplm.train` line printed first; here we call the same `main` in this process,
# which saves starting Python again:

# %%
import contextlib
import io

from looplm.train import main as train_main   # what `python -m looplm.train` runs

with tempfile.TemporaryDirectory() as folder:
    argv = ["--recipe", "two-stage", "--task", "stack", "--difficulty", "3", "--n-train", "2000", "--steps", "60",
            "--stage2-steps", "20", "--batch-size", "16", "--d-model", "32", "--n-loops", "3", "--no-progress",
            "--out", str(Path(folder) / "run")]
    print("$ python -m looplm.train", " ".join(argv).replace(folder, "DIR"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = train_main(argv)
    print(printed.getvalue().replace(folder, "DIR"), "exit status:", status)

# %% [markdown]
# ## 5.9 Bad input gets a clear error
#
# A gate's functions check what they are given. Each of these is a mistake that would
# otherwise give a silently wrong number:

# %%
def show_error(call):
    try:
        call()
    except (ValueError, TypeError) as error:
        print(f"{type(error).__name__}: {error}")
    else:
        print("no error")


torch.manual_seed(0)
plain_model = LoopLM(LoopLMConfig(vocab_size=VOCAB_SIZE, d_model=32, n_heads=4, n_loops=3))
gated_model = LoopLM(LoopLMConfig(vocab_size=VOCAB_SIZE, d_model=32, n_heads=4, n_loops=3, exit_gate=True))
bad_idx = torch.randint(0, VOCAB_SIZE, (2, 6))
bad_out = gated_model(bad_idx, targets=bad_idx)
show_error(lambda: q_exit_steps(bad_out.gate, 0.0))                                   # q outside (0, 1]
show_error(lambda: QExit(1.5))
show_error(lambda: stage1_loss(bad_out.step_losses, bad_out.exit_probs, beta=-0.1))   # beta < 0
show_error(lambda: stage1_loss(bad_out.step_losses[:2], bad_out.exit_probs, beta=0.1))  # shapes differ
show_error(lambda: stage2_gate_loss(bad_out.step_losses, bad_out.gate[:, :1]))
show_error(lambda: q_exit_steps(plain_model(bad_idx).gate, 0.5))                      # no gate
show_error(lambda: exit_steps(QExit(0.5), plain_model(bad_idx)))
show_error(lambda: AdaptiveLoss("stage1")(plain_model, bad_idx, bad_idx))
show_error(lambda: make_exit_rule("median", 0.5))

# %% [markdown]
# Appendix C holds the same cases as a test, with the rest of the battery.

# %% [markdown]
# ## Summary
#
# `looplm/adaptive.py` holds the exit distribution and the two stages' losses (the Trainer
# loss functions around them are Appendix C.6's), and `looplm/exits.py` the exit rules; the
# gate itself, `LinearExitGate`, is registered in `EXIT_GATES["linear"]` in `looplm/model.py`,
# and the recipe lives in `looplm/train/__init__.py`.
#
# | name | what it does |
# |---|---|
# | `exit_distribution(gate)`, `exit_entropy`, `expected_depth` | $p_t$ from the gates, $H(p)$, $\mathbb{E}[t]$ |
# | `stage1_loss(step_losses, exit_probs, beta, mask=None)`, `AdaptiveLoss` | Ouro's Stage I (with `last_weight`, mixed with the last step's loss; `OBJECTIVES` for the others) as a `Trainer` loss |
# | `stage2_gate_loss(step_losses, gate, k=50.0, gamma=0.005, mask=None)`, `GateLoss`, `gate_only` | Stage II: the gate alone on detached improvement labels |
# | `q_exit_steps(gate, q, min_steps=1)` | Ouro's Q-exit |
# | `QExit`, `ConfidenceExit`, `KLExit`, `HiddenChangeExit`, `FixedDepth`, `EXIT_RULES`, `make_exit_rule` | exit rules that decide step by step from a `StepView` |
# | `exit_steps(rule, out, per="token" or "sequence")`, `select_exit_logits`, `mean_steps` | apply a rule to a forward pass |
# | `pick_exit_threshold(model, val_data)` | the Q-exit threshold to deploy, chosen on validation data |
# | `check_exit_probs`, `stability_report` | the stability checks |
# | `train_stage1`, `train_stage2`, `train_two_stage`, `RECIPES["two-stage"]` | the two stages, with the last step learned first, also as `python -m looplm.train --recipe two-stage` |
#
# What we measured on the stack task, over three seeds unless marked otherwise:
#
# - without the entropy bonus each token's exit mass collapsed onto one step, for most tokens
#   the first (one seed);
# - Ouro's Eq. 4 from the first update kept the mass spread but left the model about 20 points
#   below the same model trained without a gate (0.609 at its best step against 0.813),
#   because it weights the early readouts from the start; the same weights without a gate
#   fall short the same way;
# - training the last step first (half of Stage I), then an even mix of the last step's loss
#   and Eq. 4, kept the baseline's accuracy (0.846 at 4 steps); with Stage II and a threshold
#   picked on validation data, the gated model matched the baseline (0.839 against 0.813) with
#   3.26 steps per answer token instead of 4;
# - Stage II moved the exit mass earlier (it raised $H(p)$ and lowered $\mathbb{E}[t]$) without
#   improving accuracy per step over the Stage I gate;
# - the gate spent only slightly more steps on harder programs; below about three steps per
#   token no rule kept the accuracy; and a gate trained at 4 steps did not turn a larger loop
#   budget into accuracy on longer inputs.
#
# Chapter 6 trains the same gate with other objectives and halts a different kind of loop;
# chapter 7 takes the exit rules into decoding, where stopping early must save real work and
# the KV cache must stay correct for the tokens that stopped.

# %% [markdown]
# ## Exercises
#
# Each exercise is a module in `exercises/ch05/` with a function for you to write, plus a file
# of graded tests next to it. Open the module, read its docstring, and replace the
# `raise NotImplementedError(...)`. The reference solutions are in `exercises/solutions/ch05/`,
# to read after you have tried. Under each exercise are hints, folded away: open them one at a
# time, and only when you are stuck.

# %% [markdown]
# **Exercise 5.1: The exit distribution** (`ex1_exit_distribution.py`). Write
# `exit_distribution(gate)`, section 5.2's distribution: from the gates $\lambda$, $[S, \dots]$,
# compute $p_t = \lambda_t \prod_{j<t} (1 - \lambda_j)$ for $t < S$ and give the last step the
# remaining mass, $p_S = \prod_{j<S} (1 - \lambda_j)$, for every token at once, refusing gates
# that are not probabilities. The tests compare values and gradients with a loop over one
# token's gates, check that the $p$'s sum to one and that $\lambda_S$ plays no part, and work
# through a case by hand.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# The survival probabilities $r_t = \prod_{j \le t} (1 - \lambda_j)$ of all steps come from
# one call, `torch.cumprod(1 - gate, dim=0)`. Which of them does $p$ need?
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# $p$ needs $r_0, \dots, r_{S-1}$: the cumulative product of `1 - gate[:-1]`, with a row of
# ones in front for $r_0 = 1$ (`torch.cat([torch.ones_like(gate[:1]), survive])`). That tensor
# has $S$ rows, like `gate`.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# With `reach` holding $r_0, \dots, r_{S-1}$, the answer is
# `torch.cat([gate[:-1] * reach[:-1], reach[-1:]])`. For $S = 1$, `gate[:-1]` is empty and the
# result is a single 1. Check the input before computing: floating point, a step dimension, no
# NaN or inf, every value in $[0, 1]$.
# ```

# %% [markdown]
# **Exercise 5.2: The Q-exit rule** (`ex2_q_exit.py`). Write `q_exit_steps(gate, q, min_steps=1)`,
# the inference rule of section 5.5: the first step $t$, counted from 1, whose cumulative exit
# probability reaches $q$, never below `min_steps`, and the last step $S$ if none does. You may
# use the book's `exit_distribution`. The tests compare with a slow loop over many values of
# $q$ and floors, check cases whose CDFs can be added up by hand, and make sure that the last
# step ends every token, even when rounding leaves its CDF a hair below one.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# `exit_distribution(gate).cumsum(0) >= q` is a boolean tensor $[S, \dots]$: for every token,
# the steps at which it may stop. The answer is the first `True` along dimension 0.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# Write the two extra rules into that mask before looking for the first `True`: the last step
# always qualifies (`reached[-1] = True`), and no step before `min_steps` does
# (`reached[:min_steps - 1] = False`).
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# `argmax` returns the index of the first maximum, so `reached.long().argmax(0) + 1` is the
# first qualifying step counted from 1. Check `q` positively, `0 < q <= 1`, so that NaN fails,
# and refuse booleans, which Python counts as ints.
# ```

# %% [markdown]
# **Exercise 5.3: The Stage II targets and gate loss** (`ex3_stage2_targets.py`). Write
# `stage2_gate_loss(step_losses, gate, k, gamma, mask)`, the loss of section 5.4: the
# improvements $I_t = \max(0, L_{t-1} - L_t)$ on detached losses, the soft labels
# $\omega_t = \sigma(\kappa(I_t - \gamma))$ for "continue" ($\kappa$ is the argument `k`), and the
# binary cross-entropy against $1 - \lambda_{t-1}$, averaged over the tokens the mask keeps,
# summed over $t = 2, \dots, S$ and divided by $S$. This is the book's pairing of $\omega_t$ with
# $\lambda_{t-1}$, which deviates from Eq. 6 as printed (it pairs $\omega^{(t)}$ with
# $\lambda^{(t)}$; section 5.4 says why). The
# tests compare with a loop over steps and tokens, check the gate's gradient against its
# closed form and that none reaches the losses, and check that masked-out tokens change
# nothing.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Everything is a shift by one step along dimension 0. On `losses = step_losses.detach()`,
# `losses[:-1] - losses[1:]` holds $L_{t-1} - L_t$ for $t = 2, \dots, S$, an $[S-1, \dots]$
# tensor, and `gate[:-1]` holds the gates $\lambda_1, \dots, \lambda_{S-1}$ that pair with it.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# The labels are `torch.sigmoid(k * (improvement.clamp_min(0) - gamma))`, and the cross-entropy
# is `-(w * log(1 - stop) + (1 - w) * log(stop))` with `stop = gate[:-1]`, each log clamped
# with `.clamp_min(-100)`. Compute in `torch.promote_types(gate.dtype, torch.float32)`.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# For the mean over the kept tokens, zero the others with `torch.where(mask, bce, 0)`, sum each
# step over its tokens (`.flatten(1).sum(1)`) and divide by `mask.sum()`. Then sum over the
# $S - 1$ steps and divide by $S$.
# ```

# %% [markdown]
# **Exercise 5.4: Where Stage I sends the exit mass** (`ex4_stage1_optimum.py`). Hold the step
# losses fixed, as the gate sees them in one update, and ask which exit distribution minimises
# Eq. 4 for one token, $\sum_t p_t L_t - \beta H(p)$. Write `stage1_optimum(step_losses, beta)`,
# which returns that distribution for every token, and `beta_for_entropy(step_losses, entropy)`,
# the $\beta$ at which the optimum of one token's losses has a given entropy. The tests train
# free gates with the package's own `stage1_loss` and `exit_distribution` until they converge
# and compare the distribution they reach with yours (to $10^{-6}$), check that the loss's
# gradient vanishes at your distribution, and measure the entropy at your $\beta$ (to a relative
# $10^{-9}$). Then answer: which $\beta$ gives $H(p) = 1$ nat for the losses
# $(2, 1, 0.5, 0.25)$? What happens to the optimum when every loss is multiplied by 3, and what
# does that say about a fixed $\beta$ late in training, when the losses are small? Which
# entropies can no $\beta$ reach?

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# For one token this is a minimisation over the probability simplex: minimise
# $\sum_t p_t L_t + \beta \sum_t p_t \log p_t$ subject to $\sum_t p_t = 1$. For $\beta > 0$
# the objective is strictly convex in $p$, so a point where a Lagrange multiplier balances the
# gradient is the one minimum.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# The condition is $L_t + \beta(\log p_t + 1) = \mu$ for every $t$, so $\log p_t$ is
# $-L_t/\beta$ plus a constant: $p_t \propto e^{-L_t/\beta}$. One torch function normalises that
# over dimension 0.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# `torch.softmax(-step_losses / beta, dim=0)` is a Gibbs distribution at temperature $\beta$:
# its entropy grows with $\beta$, from $\log m$ as $\beta \to 0$ ($m$ the number of steps that
# share the lowest loss) to $\log S$ as $\beta \to \infty$. Outside $(\log m, \log S)$ no
# $\beta$ exists; inside, bisect on $\log \beta$ until the entropy matches.
# ```

# %% [markdown]
# **Exercise 5.5: Which gate does Stage II teach?** (`ex5_stage2_pairing.py`). Section 5.4
# pairs the label of step $t$'s improvement with the gate of step $t - 1$; Eq. 6 as printed
# pairs it with the gate of step $t$. Write
# `stage2_trained_gates(step_losses, gate, pairing="book", k=50.0, gamma=0.005)`: the gates Stage
# II converges to, for either pairing, when the step losses are held fixed and each token's
# gate values are free, starting from `gate`. The tests train such gates with the package's
# own `stage2_gate_loss` (shifted by one step for the printed pairing) and compare, to
# $10^{-6}$. Then use it: for a token whose losses are $(1.0, 0.4, 0.39, 0.39)$, so that only
# step 2 helps, with untrained gates of $\tfrac12$, what expected exit step does each pairing
# give, and how much mass does each put on step 1, before the step that helps?

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# With free gates, every gate value of every token appears in at most one term of the loss.
# Which term, under each pairing, and which gate appears in none? A gate that appears in none
# gets no gradient and keeps its starting value.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# One term is $-[w \log(1 - \lambda) + (1 - w) \log \lambda]$. Its derivative in $\lambda$
# vanishes where $1 - \lambda = w$: the trained gate says "continue" with exactly the
# probability of its label.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# `looplm.adaptive.stage2_targets(step_losses, k, gamma)` gives $\omega_2, \dots, \omega_S$, an
# $[S-1, \dots]$ tensor. Book pairing: `trained[:-1] = 1 - w`, and $\lambda_S$ keeps its value.
# Printed pairing: `trained[1:] = 1 - w`, and $\lambda_1$ keeps its value. For the worked
# example, apply `exit_distribution` and `expected_depth` to both.
# ```

# %% [markdown]
# The next cell grades your versions. Run it again whenever you like; every test fails until
# you write the code.

# %%
from looplm.grade import grade

report = grade("ch05")
