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
# # Appendix C, continued: the gate's machinery
#
# What chapter 5 uses and does not show: the exit rules as objects, the two-stage recipe as
# functions and on the command line, the stability checks, the stored experiment behind
# section 5.7, and the tests of the gate, the losses and the exit rules. Its cells build
# `looplm/exits.py` and extend `looplm/adaptive.py`, `looplm/train/__init__.py` and
# `looplm/experiments.py`.

# %% tags=["hide-input"]
import contextlib
import io
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import looplm
from looplm.checks import require_int, require_number
from looplm.adaptive import (_NO_GATE, AdaptiveLoss, GateLoss, _require_steps, exit_distribution,
                             gate_on_detached_states, gate_only, stage1_loss, stage2_gate_loss,
                             stage2_targets)
from looplm.exits import (EXIT_RULES, confidence_exit_steps, hidden_change_exit_steps,
                          kl_exit_steps, make_exit_rule)
from looplm.data import TASK_VOCAB
from looplm.diagnostics import hidden_norms, step_changes
from looplm.model import LinearExitGate, LoopLM, LoopLMConfig
from looplm.testing import run_tests
from looplm.train import RECIPES, Recipe, TrainConfig

torch.set_num_threads(1)
_ = torch.manual_seed(0)
print("torch", torch.__version__, "| looplm", looplm.__version__)

# %% [markdown]
# The next cell names the default module of this part, chapter 5's `looplm/adaptive.py`.

# %%
#| default_exp adaptive

# %% tags=["remove-cell"]
#| test
import pytest

from looplm.adaptive import (GateLoss, exit_distribution, exit_entropy, expected_depth,
                             gate_on_detached_states, gate_only, q_exit_steps, stage1_loss,
                             stage2_gate_loss, stage2_targets)
from looplm.exits import (EXIT_RULES, ConfidenceExit, FixedDepth, QExit, confidence_exit_steps,
                          exit_steps, hidden_change_exit_steps, kl_exit_steps, make_exit_rule,
                          mean_steps, select_exit_logits)
from looplm.model import LinearExitGate

# %% [markdown]
# ## C.6 The gate's objects: a Trainer loss and the exit rules

# %% [markdown]
# ### The Stage I loss as a Trainer loss function
#
# `AdaptiveLoss` is what section 5.3 trains with: a `loss_fn(model, idx, targets) -> (loss,
# metrics)` for the Trainer. It runs the model, applies an objective to the step losses and the
# gate, and reports the mean last-step loss and the entropy, expected depth and mass per step
# of $p$ over the answer tokens. It is a small class so that it can carry options, and a
# random generator for an objective that samples (chapter 6 has one).

# %%
#| export
def _exit_summary(out, mask, probs=None):
    """Metrics of an exit distribution (default out.exit_probs) over the tokens in mask:
    entropy, expected depth, mass per step, and the last step's loss."""
    with torch.no_grad():
        probs = (out.exit_probs if probs is None else probs).float()
        weights = mask.float()
        count = weights.sum()
        summary = {"entropy": (exit_entropy(probs) * weights).sum().item() / count.item(),
                   "depth": (expected_depth(probs) * weights).sum().item() / count.item()}
        for t, mass in enumerate(((probs * weights).sum((1, 2)) / count).tolist(), start=1):
            summary[f"mass_{t}"] = mass
        summary["last_loss"] = (out.step_losses[-1] * weights).sum().item() / count.item()
    return summary


class AdaptiveLoss:
    """loss_fn(model, idx, targets) -> (loss, metrics) for the Trainer, for a model with a gate.

    objective: a key of OBJECTIVES; "stage1" is Ouro's Eq. 4 with options beta and last_weight
    (w * mean last-step loss + (1 - w) * Eq. 4; section 5.3 says why). Chapter 6 registers
    "act", "pondernet" and "gumbel". The metrics: the mean last-step loss, and the entropy,
    expected depth and mass per step of p over the answer tokens.
    """

    def __init__(self, objective="stage1", **options):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(repr(o) for o in OBJECTIVES)}; "
                             f"got {objective!r}")
        entry = OBJECTIVES[objective]
        unknown = sorted(set(options) - set(entry.options))
        if unknown:
            raise ValueError(f"objective {objective!r} takes options {sorted(entry.options)}, got {unknown}")
        self.objective, self.entry = objective, entry
        self.options = entry.check({**entry.options, **options}) if entry.check else {**entry.options, **options}
        self.generator = torch.Generator().manual_seed(self.options.pop("seed")) if entry.random else None

    def __call__(self, model, idx, targets):
        if getattr(model, "exit_gate", None) is None:
            raise ValueError("AdaptiveLoss trains an exit gate, and this model was built without one: "
                             "use LoopLMConfig(..., exit_gate=True)")
        out = model(idx, targets=targets)
        mask = targets != IGNORE_INDEX
        loss, probs = self.entry.loss(out, mask, self.generator, **self.options)
        return loss, _exit_summary(out, mask, probs)

    def state_dict(self):
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state):
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    def __repr__(self):
        return f"AdaptiveLoss({self.objective!r}, {', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

# %% [markdown]
# `OBJECTIVES` is a registry like chapter 2's: a name maps to an `Objective`, which holds the
# loss as a function of the forward pass, the options with their defaults, and whether it draws
# random numbers. Stage I is its first entry; chapter 6 adds three more.

# %%
#| export
@dataclass(frozen=True)
class Objective:
    """An entry of OBJECTIVES. loss(out, mask, generator, **options) -> (loss, p or None), where p
    [S, B, T] is the exit distribution the metrics describe (None: out.exit_probs); options maps
    each option to its default; check(options) -> options validates them; random: the loss
    draws from a generator, seeded by the option "seed"."""

    loss: Callable
    options: dict
    check: Callable | None = None
    random: bool = False


def _stage1_objective(out, mask, generator, beta, last_weight):
    if last_weight == 1:
        return out.loss, None                  # the last step's mean loss; the gate gets no gradient
    loss = stage1_loss(out.step_losses, out.exit_probs, beta, mask)
    return (last_weight * out.loss + (1 - last_weight) * loss if last_weight else loss), None


def _check_stage1(options):
    return {"beta": require_number("beta", options["beta"], low=0),
            "last_weight": require_number("last_weight", options["last_weight"], low=0, high=1)}


OBJECTIVES = {"stage1": Objective(_stage1_objective, {"beta": 0.1, "last_weight": 0.0}, _check_stage1)}

# %% [markdown]
# ### The Stage II loss, and a frozen model
#
# Section 5.4's Stage II trains the gate alone: `GateLoss` runs `gate_on_detached_states`
# and applies `stage2_gate_loss`, and `gate_only` freezes every parameter outside the gate
# for the length of a `with` block.

# %%
#| export
class GateLoss:
    """Stage II loss_fn(model, idx, targets) -> (loss, metrics): trains the exit gate only (Eq. 6)."""

    def __init__(self, k=50.0, gamma=0.005):
        self.k = require_number("k", k, low=0, low_open=True)
        self.gamma = require_number("gamma", gamma)

    def __call__(self, model, idx, targets):
        out = gate_on_detached_states(model, idx, targets)
        mask = targets != IGNORE_INDEX
        loss = stage2_gate_loss(out.step_losses, out.gate, self.k, self.gamma, mask)
        return loss, _exit_summary(out, mask)

    def __repr__(self):
        return f"GateLoss(k={self.k}, gamma={self.gamma})"


class gate_only:
    """with gate_only(model): every parameter outside model.exit_gate has requires_grad=False."""

    def __init__(self, model):
        if getattr(model, "exit_gate", None) is None:
            raise ValueError("this model was built without an exit gate: use LoopLMConfig(..., exit_gate=True)")
        self.model = model

    def __enter__(self):
        gate_ids = {id(p) for p in self.model.exit_gate.parameters()}
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(id(p) in gate_ids)
        return [p for p, _ in self.saved if id(p) in gate_ids]

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.requires_grad_(flag)
        return False

# %% [markdown]
# ### Exit rules as objects
#
# Section 5.5 describes the exit rules and what each one sees after a step; here they are as
# code. They go to a module of their own, `looplm/exits.py`: training never needs them, and
# the decoder of chapter 7 needs nothing else of chapter 5's. A rule is an object with a
# threshold, a `score(view)` per token and a `stop(view)` that compares the two:

# %% tags=["hide-input"]
#| export exits
import math
from dataclasses import dataclass

import torch

from looplm.adaptive import _NO_GATE, _check_gate, _check_q, _require_steps, _token_mean, q_exit_steps
from looplm.checks import require_int, require_number
from looplm.data import IGNORE_INDEX, answer_accuracy

# %%
#| export exits
@dataclass
class StepView:
    """What an exit rule may look at after step t (counted from 1), for every token."""

    step: int
    logits: torch.Tensor | None = None       # [..., V] readout of step t
    prev_logits: torch.Tensor | None = None  # [..., V] readout of step t-1 (None at t = 1)
    gates: torch.Tensor | None = None        # [t, ...] the gates λ_1 .. λ_t
    hidden: torch.Tensor | None = None       # [..., D] the state h_t
    prev_hidden: torch.Tensor | None = None  # [..., D] h_{t-1} (None at t = 1)

    @property
    def token_shape(self):
        for tensor, cut in ((self.logits, -1), (self.hidden, -1), (self.gates, None)):
            if tensor is not None:
                return tensor.shape[1:] if cut is None else tensor.shape[:-1]
        raise ValueError("a StepView needs at least one of logits, gates or hidden")


class ExitRule:
    """Decides after each step which tokens stop. A rule scores each token from a StepView and
    stops it when the score passes the threshold (>= if stop_above, else <=), from min_steps on.
    """

    name = "rule"
    needs = ()             # the StepView tensors score() reads: "logits", "gates", "hidden"
    stop_above = True
    default_threshold = None   # the threshold when none is given (None: it must be given)

    def __init__(self, threshold=None, min_steps=1):
        if threshold is None:
            if self.default_threshold is None:
                raise ValueError(f"{type(self).__name__} needs a threshold")
            threshold = self.default_threshold
        self.threshold = self._check_threshold(threshold)
        self.min_steps = require_int("min_steps", min_steps, 1)

    def _check_threshold(self, threshold):
        return require_number("threshold", threshold)

    def score(self, view):
        raise NotImplementedError

    def passes(self, score):
        return score >= self.threshold if self.stop_above else score <= self.threshold

    def stop(self, view, score=None):
        """Bool [...]: True for the tokens that stop at step view.step (given they got there)."""
        score = self.score(view) if score is None else score
        if view.step < self.min_steps:
            return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
        return self.passes(score)

    def __repr__(self):
        return f"{type(self).__name__}({self.threshold!r}, min_steps={self.min_steps})"

# %% [markdown]
# The five rules. Each is a few lines: a default threshold, a threshold check and a score.
# The defaults are the values this chapter and chapter 7 use unless told otherwise: $q = 0.5$
# for the Q-exit, top probability $0.9$, a KL of $5 \cdot 10^{-4}$ (Huginn's), a relative
# change of the state of $0.03$, and depth $2$.

# %%
#| export exits
def _never_at_first_step(view, reference):
    return torch.full(view.token_shape, math.inf, device=reference.device)


class QExit(ExitRule):
    """Ouro's Q-exit: stop when the exit CDF reaches q (score: CDF of the steps so far)."""

    name, needs, stop_above, default_threshold = "q_exit", ("gates",), True, 0.5

    def _check_threshold(self, q):
        return _check_q(q)

    def score(self, view):
        gates = view.gates.to(torch.promote_types(view.gates.dtype, torch.float32))   # (t, ...)
        reach = torch.cat([torch.ones_like(gates[:1]), torch.cumprod(1 - gates[:-1], 0)])
        return (gates * reach).cumsum(0)[-1]      # Σ_{j<=t} p_j, as in q_exit_steps for t < S


class ConfidenceExit(ExitRule):
    """Stop when the top next-token probability reaches the threshold."""

    name, needs, stop_above, default_threshold = "confidence", ("logits",), True, 0.9

    def _check_threshold(self, threshold):
        return require_number("threshold", threshold, low=0, high=1, low_open=True)

    def score(self, view):
        return view.logits.float().softmax(-1).max(-1).values


class KLExit(ExitRule):
    """Huginn's rule: stop when KL(p_t || p_{t-1}) between successive predictions is <= eps."""

    name, needs, stop_above, default_threshold = "kl", ("logits",), False, 5e-4

    def _check_threshold(self, eps):
        return require_number("eps", eps, low=0, low_open=True)

    def score(self, view):
        if view.prev_logits is None:
            return _never_at_first_step(view, view.logits)
        log_p, log_prev = view.logits.float().log_softmax(-1), view.prev_logits.float().log_softmax(-1)
        return (log_p.exp() * (log_p - log_prev)).sum(-1)


class HiddenChangeExit(ExitRule):
    """Stop when the relative change of the state ||h_t - h_{t-1}|| / ||h_{t-1}|| is <= eps."""

    name, needs, stop_above, default_threshold = "hidden_change", ("hidden",), False, 0.03

    def _check_threshold(self, eps):
        return require_number("eps", eps, low=0, low_open=True)

    def score(self, view):
        if view.prev_hidden is None:
            return _never_at_first_step(view, view.hidden)
        h, prev = view.hidden.float(), view.prev_hidden.float()
        return (h - prev).norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-12)


class FixedDepth(ExitRule):
    """Stop every token at step n (score: the step itself)."""

    name, needs, stop_above, default_threshold = "fixed", (), True, 2

    def _check_threshold(self, n):
        return require_int("n", n, 1)

    def score(self, view):
        any_tensor = next(x for x in (view.logits, view.gates, view.hidden) if x is not None)
        return torch.full(view.token_shape, float(view.step), device=any_tensor.device)


EXIT_RULES = {rule.name: rule for rule in (QExit, ConfidenceExit, KLExit, HiddenChangeExit, FixedDepth)}


def make_exit_rule(name, *args, **kwargs):
    """The exit rule called `name` (a key of EXIT_RULES), built with the given threshold (default:
    the rule's default_threshold)."""
    if name not in EXIT_RULES:
        raise ValueError(f"unknown exit rule {name!r}; valid rules: {', '.join(EXIT_RULES)}")
    return EXIT_RULES[name](*args, **kwargs)

# %% [markdown]
# `exit_steps` takes a `LoopOutput` (or the tensors by name), checks that the rule gets what it
# needs, and walks the stored steps, per token or per sequence, as section 5.5 describes:

# %%
#| export exits
def _steps_input(rule, out, logits, gate, hidden):
    if not isinstance(rule, ExitRule):
        raise TypeError(f"rule must be an ExitRule (see EXIT_RULES), got {type(rule).__name__}")
    if out is not None:
        if any(x is not None for x in (logits, gate, hidden)):
            raise ValueError("pass either out or the tensors logits/gate/hidden, not both")
        logits, gate, hidden = out.logits, out.gate, out.hidden
    rule_name = type(rule).__name__
    if "gates" in rule.needs and gate is None:
        raise ValueError(f"{rule_name} needs the exit gate, but gate is None: it comes from {_NO_GATE}")
    if "hidden" in rule.needs and hidden is None:
        raise ValueError(f"{rule_name} needs the loop states, but hidden is None: run the model "
                         f"with return_hidden=True")
    if "logits" in rule.needs and logits is None:
        raise ValueError(f"{rule_name} needs the per-step logits, but logits is None")
    shapes = {}
    if logits is not None:
        shapes["logits"] = tuple(_require_steps("logits", logits).shape[:-1])
    if gate is not None:
        shapes["gate"] = tuple(_check_gate(gate).shape)
    if hidden is not None:
        shapes["hidden"] = tuple(_require_steps("hidden", hidden).shape[:-1])
    if not shapes:
        raise ValueError("exit_steps needs at least one of logits, gate or hidden")
    if len(set(shapes.values())) > 1:
        raise ValueError("logits [S, ..., V], gate [S, ...] and hidden [S, ..., D] disagree on the "
                         "steps or tokens: " + ", ".join(f"{k} {list(v)}" for k, v in shapes.items()))
    return logits, gate, hidden, next(iter(shapes.values()))


def step_view(t, logits=None, gate=None, hidden=None):
    """The StepView of step t (from 1) from stored per-step tensors [S, ...]."""
    return StepView(step=t,
                    logits=None if logits is None else logits[t - 1],
                    prev_logits=None if logits is None or t == 1 else logits[t - 2],
                    gates=None if gate is None else gate[:t],
                    hidden=None if hidden is None else hidden[t - 1],
                    prev_hidden=None if hidden is None or t == 1 else hidden[t - 2])


def exit_steps(rule, out=None, *, logits=None, gate=None, hidden=None, per="token", reduce="all",
               mask=None):
    """Steps used per token under an exit rule: LongTensor [...] (from 1; S if the rule never fires).

    out: a LoopOutput (or pass logits [S, ..., V], gate [S, ...], hidden [S, ..., D] by name).
    per="token": each token stops on its own. per="sequence" (tokens [B, T]): a row stops when
    its last token stops (reduce="all"), or when its mean score passes the threshold
    (reduce="mean"); only tokens in mask [B, T] count. Returned per token, equal along a row.
    """
    logits, gate, hidden, shape = _steps_input(rule, out, logits, gate, hidden)
    n_steps, token_shape = shape[0], shape[1:]
    if per not in ("token", "sequence"):
        raise ValueError(f"per must be 'token' or 'sequence', got {per!r}")
    if reduce not in ("all", "mean"):
        raise ValueError(f"reduce must be 'all' or 'mean', got {reduce!r}")
    if per == "sequence" and len(token_shape) != 2:
        raise ValueError(f"per='sequence' needs tokens [B, T], got token shape {list(token_shape)}")
    if mask is None:
        mask = torch.ones(token_shape, dtype=torch.bool)
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != token_shape:
        raise ValueError(f"mask must be a bool tensor of the token shape {list(token_shape)}")
    device = next(x for x in (logits, gate, hidden) if x is not None).device
    mask = mask.to(device)
    if per == "sequence" and not mask.any(-1).all():
        raise ValueError("mask selects no token in some row, so that sequence has no step to take")

    steps = torch.full(token_shape, n_steps, dtype=torch.long, device=device)
    done = torch.zeros(token_shape, dtype=torch.bool, device=device)
    for t in range(1, n_steps + 1):
        view = step_view(t, logits, gate, hidden)
        if per == "sequence" and reduce == "mean":
            score = rule.score(view)                                          # (B, T)
            row_score = torch.where(mask, score, 0).sum(-1) / mask.sum(-1)    # (B,)
            stop = rule.stop(view, score=row_score)[:, None].expand(token_shape)
        else:
            stop = rule.stop(view)
        steps = torch.where(stop & ~done, t, steps)
        done = done | stop
    if per == "sequence" and reduce == "all":
        row_steps = torch.where(mask, steps, 0).max(-1).values               # (B,)
        steps = row_steps[:, None].expand(token_shape).clone()
    return steps

# %% [markdown]
# Section 5.5's `select_exit_logits` (each token's readout at its exit step), the mean step
# count over answer tokens, and the choice of the Q-exit threshold on held-out data:

# %%
#| export exits
def select_exit_logits(logits, steps):
    """Each token's readout at its exit step: logits [S, ..., V], steps [...] (from 1) -> [..., V]."""
    _require_steps("logits", logits)
    if not isinstance(steps, torch.Tensor) or steps.dtype != torch.long:
        raise TypeError(f"steps must be a LongTensor of steps counted from 1, got "
                        f"{type(steps).__name__}{'' if not isinstance(steps, torch.Tensor) else ' of dtype ' + str(steps.dtype)}")
    if steps.shape != logits.shape[1:-1]:
        raise ValueError(f"steps {list(steps.shape)} must have the token shape of logits "
                         f"{list(logits.shape)}, i.e. {list(logits.shape[1:-1])}")
    n_steps = logits.shape[0]
    if steps.numel() and (steps.min() < 1 or steps.max() > n_steps):
        raise ValueError(f"steps are counted from 1 and must lie in [1, {n_steps}], got min "
                         f"{steps.min().item()} and max {steps.max().item()}")
    index = (steps - 1).unsqueeze(0).unsqueeze(-1).expand(1, *steps.shape, logits.shape[-1])
    return logits.gather(0, index.to(logits.device)).squeeze(0)             # (..., V)


def mean_steps(steps, mask=None):
    """Average steps used over the tokens in mask (all tokens if None): a float."""
    return _token_mean(steps.float(), mask).item()


QEXIT_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


@torch.no_grad()
def pick_exit_threshold(model, data, thresholds=QEXIT_THRESHOLDS, tolerance=0.01):
    """The Q-exit threshold to deploy, chosen on held-out data (a validation TaskBatch, never the
    test set): among the thresholds whose exact match is within `tolerance` of the best, the
    one with the fewest mean steps per answer token. -> (q, [(q, accuracy, mean steps), ...])."""
    out = model(data.idx)
    if out.gate is None:
        raise ValueError("pick_exit_threshold reads the exit gate, and this model was built without one")
    mask = data.targets != IGNORE_INDEX
    table = []
    for q in thresholds:
        steps = q_exit_steps(out.gate, q)
        accuracy = answer_accuracy(select_exit_logits(out.logits, steps), data.targets).float().mean().item()
        table.append((q, accuracy, mean_steps(steps, mask)))
    best = max(accuracy for _, accuracy, _ in table)
    q = min((row for row in table if row[1] >= best - tolerance), key=lambda row: (row[2], row[0]))[0]
    return q, table

# %% [markdown]
# For convenience, each rule also has a plain function in the style of `q_exit_steps`:

# %%
#| export exits
def confidence_exit_steps(logits, threshold=0.9, min_steps=1):
    """Steps used per token: first t with max softmax prob >= threshold, else S. [S, ..., V] -> [...]."""
    return exit_steps(ConfidenceExit(threshold, min_steps), logits=logits)


def kl_exit_steps(logits, eps=5e-4, min_steps=1):
    """Steps used per token: first t >= 2 with KL(p_t || p_{t-1}) <= eps (Huginn), else S."""
    return exit_steps(KLExit(eps, min_steps), logits=logits)


def hidden_change_exit_steps(hidden, eps=0.03, min_steps=1):
    """Steps used per token: first t >= 2 with ||h_t - h_{t-1}|| / ||h_{t-1}|| <= eps, else S."""
    return exit_steps(HiddenChangeExit(eps, min_steps), hidden=hidden)

# %% [markdown]
# ## C.7 Two stages in one call
#
# Chapter 5, section 5.8, describes the recipe; these are its functions: `train_stage1`,
# `train_stage2` and `train_two_stage`, in `looplm/train/__init__.py` beside the Trainer.

# %%
#| export train
from looplm.adaptive import AdaptiveLoss, GateLoss, gate_only
from looplm.model import LoopLM


def _require_gated(model):
    if not isinstance(model, LoopLM) or model.exit_gate is None:
        raise ValueError("the two-stage recipe trains an exit gate: build the model with "
                         "LoopLMConfig(..., exit_gate=True)")


def train_stage1(model, get_batch, config, beta=0.1, warm_steps=0, last_weight=0.0, evaluate=None):
    """Stage I: model and gate together for config.steps updates. The first warm_steps train on
    the last step's loss alone; the rest on last_weight * last-step loss + (1 - last_weight) *
    Ouro's Eq. 4 (entropy weight beta). -> the Trainer."""
    _require_gated(model)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    require_int("warm_steps", warm_steps, 0)
    if warm_steps > config.steps:
        raise ValueError(f"warm_steps={warm_steps} is more than the {config.steps} Stage I updates")
    trainer = Trainer(model, get_batch, config, loss_fn=AdaptiveLoss("stage1", beta=beta, last_weight=1.0),
                      evaluate=evaluate)
    trainer.run(until=warm_steps)
    trainer.loss_fn = AdaptiveLoss("stage1", beta=beta, last_weight=last_weight)
    trainer.run()
    return trainer


def train_stage2(model, get_batch, config, k=50.0, gamma=0.005, evaluate=None):
    """Stage II: the gate alone (everything else frozen) on Ouro's Eq. 6. -> the Trainer."""
    _require_gated(model)
    with gate_only(model):                    # the optimizer below holds the gate's parameters only
        trainer = Trainer(model, get_batch, config, loss_fn=GateLoss(k, gamma), evaluate=evaluate)
        trainer.run()
    return trainer


def stage2_config(config, stage2_steps, stage2_lr=1e-2):
    """Stage II's TrainConfig from the run's: stage2_steps updates, peak stage2_lr decaying to a
    tenth of it, a short warmup, and the next batch seed."""
    require_int("stage2_steps", stage2_steps, 1)
    return dataclasses.replace(config, steps=stage2_steps, lr=stage2_lr, min_lr=stage2_lr / 10,
                               warmup_steps=min(stage2_steps - 1, max(1, stage2_steps // 20)),
                               seed=config.seed + 1)


def train_two_stage(model, get_batch, config, stage2_steps, beta=0.1, k=50.0, gamma=0.005,
                    stage2_lr=1e-2, evaluate=None, warm_steps=None, last_weight=0.5):
    """Stage I (train_stage1) for config.steps - stage2_steps updates, then Stage II
    (train_stage2) for stage2_steps updates. warm_steps defaults to half of Stage I.
    -> the Stage II Trainer; its history holds both stages' rows (key "stage": 1 or 2;
    "step" counted through both).
    """
    _require_gated(model)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    require_int("stage2_steps", stage2_steps, 1)
    stage1_steps = config.steps - stage2_steps
    if stage1_steps < 1:
        raise ValueError(f"stage2_steps={stage2_steps} leaves no Stage I update out of "
                         f"config.steps={config.steps}; use stage2_steps < steps")
    warm_steps = stage1_steps // 2 if warm_steps is None else warm_steps
    stage1_config = dataclasses.replace(config, steps=stage1_steps,
                                        warmup_steps=min(config.warmup_steps, stage1_steps - 1))
    stage1 = train_stage1(model, get_batch, stage1_config, beta, warm_steps, last_weight, evaluate)
    stage2 = train_stage2(model, get_batch, stage2_config(config, stage2_steps, stage2_lr), k, gamma, evaluate)
    stage2.history = ([{**row, "stage": 1} for row in stage1.history]
                      + [{**row, "stage": 2, "step": row["step"] + stage1_steps} for row in stage2.history])
    return stage2

# %% [markdown]
# ### The two-stage recipe on the command line
#
# `python -m looplm.train` selects a training recipe with `--recipe NAME` from the registry
# `RECIPES` (section C.3). This cell adds `"two-stage"` and its flags.

# %%
#| export train
def _two_stage_arguments(parser):
    group = parser.add_argument_group("two-stage recipe (chapter 5)")
    group.add_argument("--stage2-steps", type=int, default=None,
                       help="updates of Stage II, the gate alone (default: a fifth of --steps)")
    group.add_argument("--beta", type=float, default=0.1, help="Stage I entropy weight (default 0.1)")
    group.add_argument("--stage2-k", type=float, default=50.0, help="Stage II label slope k (default 50)")
    group.add_argument("--stage2-gamma", type=float, default=0.005,
                       help="Stage II improvement threshold gamma (default 0.005)")
    group.add_argument("--stage2-lr", type=float, default=1e-2, help="Stage II peak learning rate (default 1e-2)")
    group.add_argument("--warm-steps", type=int, default=None,
                       help="Stage I updates on the last step's loss alone (default: half of Stage I)")
    group.add_argument("--last-weight", type=float, default=0.5,
                       help="weight of the last step's loss beside Eq. 4 after the warm steps (default 0.5)")


def _with_gate(model):
    """The model itself if it has an exit gate, else a copy with a fresh gate and the same weights."""
    if model.exit_gate is not None:
        return model
    gated = LoopLM(dataclasses.replace(model.config, exit_gate=True))
    missing, unexpected = gated.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.startswith("exit_gate.") for name in missing):
        raise ValueError(f"cannot add a gate to this model: missing {missing}, unexpected {unexpected}")
    first = next(model.parameters())
    return gated.to(device=first.device, dtype=first.dtype)


def _two_stage_run(args, model, get_batch, config, evaluate):
    stage2_steps = args.stage2_steps if args.stage2_steps is not None else max(1, config.steps // 5)
    trainer = train_two_stage(_with_gate(model), get_batch, config, stage2_steps, beta=args.beta,
                              k=args.stage2_k, gamma=args.stage2_gamma, stage2_lr=args.stage2_lr,
                              evaluate=evaluate, warm_steps=args.warm_steps, last_weight=args.last_weight)
    for stage in (1, 2):
        last = [row for row in trainer.history if row["stage"] == stage][-1]
        mass = " ".join(f"{last[f'mass_{t}']:.2f}" for t in range(1, model.config.n_loops + 1))
        print(f"stage {stage} done at step {last['step']}: last-step loss {last['last_loss']:.4f}, "
              f"exit mass per step [{mass}], E[t] {last['depth']:.2f}", flush=True)
    return trainer


RECIPES["two-stage"] = Recipe(
    help="Ouro's two stages: model and exit gate with an entropy bonus, then the gate alone",
    add_arguments=_two_stage_arguments, run=_two_stage_run)

# %% [markdown]
# The recipe's test. Stage I of the recipe must be exactly a `Trainer` run on the last step's
# loss for the warm steps, then with `AdaptiveLoss("stage1", last_weight=...)` (same seed, same
# batches), and Stage II must leave every weight but the gate's where Stage I left it. So a copy
# of the same model, trained by hand for the Stage I steps only, must end with the same
# language-model weights as the recipe's model. The command
# line is checked too, including that a flag of the other recipe is refused.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
import contextlib
import copy
import dataclasses
import io
import os
import tempfile

from looplm.adaptive import AdaptiveLoss
from looplm.train import TrainConfig, Trainer, default_loss


def _recipe_batches(generator):
    idx = torch.randint(0, 20, (4, 8), generator=generator)
    return idx, idx.roll(-1, dims=1)


def test_two_stage_recipe_freezes_the_model_in_stage_two():
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2, n_loops=3, exit_gate=True, max_seq_len=8))
    by_hand = copy.deepcopy(model)
    config = TrainConfig(steps=6, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=0, progress=False)
    recipe = train_two_stage(model, _recipe_batches, config, stage2_steps=2, beta=0.1)
    assert [r["stage"] for r in recipe.history] == [1, 1, 1, 1, 2, 2]
    assert [r["step"] for r in recipe.history] == [1, 2, 3, 4, 5, 6]
    hand = Trainer(by_hand, _recipe_batches, dataclasses.replace(config, steps=4), loss_fn=default_loss)
    hand.run(until=2)                                          # half of Stage I on the last step alone
    hand.loss_fn = AdaptiveLoss("stage1", beta=0.1, last_weight=0.5)
    hand.run()
    assert [r["loss"] for r in hand.history] == [r["loss"] for r in recipe.history[:4]]
    ours, theirs = model.state_dict(), by_hand.state_dict()
    for name in ours:
        if name.startswith("exit_gate."):
            assert not torch.equal(ours[name], theirs[name]), name       # Stage II trained the gate
        else:
            torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="exit_gate=True"):
        train_two_stage(LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2)), _recipe_batches, config, 2)
    with pytest.raises(ValueError, match="leaves no Stage I update"):
        train_two_stage(model, _recipe_batches, config, stage2_steps=6)
    with pytest.raises(ValueError, match="warm_steps=9 is more than the 4 Stage I updates"):
        train_two_stage(model, _recipe_batches, config, stage2_steps=2, warm_steps=9)
    with pytest.raises(ValueError, match=r"last_weight must be a finite number in \[0, 1\]"):
        train_two_stage(model, _recipe_batches, config, stage2_steps=2, last_weight=1.5)


def test_warm_steps_train_exactly_the_last_step_loss():
    # with last_weight = 1 the Stage I loss is the last step's mean loss: the same updates as a
    # model without a gate (whose other weights start equal), and the gate never moves
    torch.manual_seed(0)
    gated = LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2, n_loops=3, exit_gate=True, max_seq_len=8))
    torch.manual_seed(0)
    plain = LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2, n_loops=3, max_seq_len=8))
    gate_before = copy.deepcopy(gated.exit_gate.state_dict())
    config = TrainConfig(steps=3, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.0,
                         eval_every=0, progress=False)
    a = train_stage1(gated, _recipe_batches, config, warm_steps=3)
    b = Trainer(plain, _recipe_batches, config)
    b.run()
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert all(torch.equal(v, gated.exit_gate.state_dict()[k]) for k, v in gate_before.items())


def test_two_stage_command_line():
    # in this process (main() is the command line), which is much faster than a subprocess
    from looplm.train import main

    with tempfile.TemporaryDirectory() as folder:
        base = ["--recipe", "two-stage", "--task", "stack", "--difficulty", "2", "--n-train", "100", "--n-test", "20",
                "--steps", "6", "--stage2-steps", "2", "--batch-size", "4", "--d-model", "16", "--n-heads", "2",
                "--n-loops", "2", "--no-progress"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(base + ["--out", folder]) == 0
        assert "stage 2 done at step 6" in out.getvalue()
        assert sorted(os.listdir(folder)) == ["checkpoint.pt", "loss.png", "metrics.jsonl"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as refused:
            main(base + ["--grad-steps", "1", "--out", folder + "/other"])
        assert refused.value.code == 2 and "--grad-steps belongs to the 'standard' recipe" in err.getvalue()
        assert not os.path.exists(folder + "/other")


run_tests(test_two_stage_recipe_freezes_the_model_in_stage_two, test_warm_steps_train_exactly_the_last_step_loss,
          test_two_stage_command_line)

# %% [markdown]
# ## C.8 Stability checks
#
# A looped model can fail quietly: a state that grows step by step until it overflows, an exit
# distribution that no longer sums to one because of a NaN in one gate, a loop that never
# settles. These checks are cheap enough to run on every evaluation batch. Chapter 3's
# `looplm.diagnostics` already measures the states (`hidden_norms`, `step_changes`); the new
# check is for the exit distribution, and a report collects them all for one output record.

# %%
#| export
def check_exit_probs(exit_probs, tol=1e-4):
    """Raise ValueError unless exit_probs [S, ...] is finite, non-negative and sums to 1 over the
    steps within tol. Returns the largest |sum - 1|."""
    _require_steps("exit_probs", exit_probs, _NO_GATE)
    tol = require_number("tol", tol, low=0)
    if not torch.isfinite(exit_probs).all():
        bad = (~torch.isfinite(exit_probs)).nonzero()[0].tolist()
        raise ValueError(f"exit_probs holds NaN or inf, first at index {bad} (step {bad[0] + 1})")
    if (exit_probs < 0).any():
        raise ValueError(f"exit_probs holds negative values, min {exit_probs.min().item():.3g}")
    deviation = (exit_probs.sum(0) - 1).abs().max().item() if exit_probs.numel() else 0.0
    if deviation > tol:
        raise ValueError(f"exit_probs must sum to 1 over the steps, but a token's sum is off by "
                         f"{deviation:.3g} > tol={tol:g}")
    return deviation

# %% [markdown]
# A report collects all of them for one output record: finite logits and losses, a proper exit
# distribution, finite and bounded states, and the **trend** of the state changes. The trend
# is informational: a loop whose relative changes shrink is settling toward a fixed point
# (Yang et al. observe one), one whose changes grow is heading for trouble, but a loop may
# also keep moving and still be useful, so it does not fail the report.

# %%
#| export
@dataclass
class StabilityCheck:
    name: str
    passed: bool
    detail: str
    required: bool = True     # an informational check does not fail the report


@dataclass
class StabilityReport:
    checks: list = field(default_factory=list)

    @property
    def ok(self):
        return all(check.passed for check in self.checks if check.required)

    def raise_if_failed(self):
        failed = [f"{c.name} ({c.detail})" for c in self.checks if c.required and not c.passed]
        if failed:
            raise ValueError("stability checks failed: " + "; ".join(failed))
        return self

    def __str__(self):
        marks = {(True, True): "ok  ", (True, False): "ok  ", (False, True): "FAIL", (False, False): "note"}
        return "\n".join(f"{marks[c.passed, c.required]} {c.name}: {c.detail}" for c in self.checks)


def stability_report(out, tol=1e-4, max_rms=1e3, raise_on_failure=False):
    """Checks of a LoopOutput: finite logits/losses, exit_probs (with a gate), hidden states
    (with return_hidden=True): finite, RMS <= max_rms, and the trend of relative step changes."""
    report = StabilityReport()
    add = report.checks.append
    add(StabilityCheck("logits finite", bool(torch.isfinite(out.logits).all()), f"shape {list(out.logits.shape)}"))
    if out.step_losses is not None:
        add(StabilityCheck("step losses finite", bool(torch.isfinite(out.step_losses).all()),
                           f"mean per step {[round(v, 3) for v in out.step_losses.float().mean(dim=tuple(range(1, out.step_losses.ndim))).tolist()]}"))
    if out.exit_probs is not None:
        try:
            add(StabilityCheck("exit_probs sum to 1", True, f"max |sum - 1| = {check_exit_probs(out.exit_probs, tol):.1e}"))
        except ValueError as e:
            add(StabilityCheck("exit_probs sum to 1", False, str(e)))
    if out.hidden is not None:
        finite = bool(torch.isfinite(out.hidden).all())
        add(StabilityCheck("hidden finite", finite, f"shape {list(out.hidden.shape)}"))
        rms = hidden_norms(out.hidden).flatten(1).max(1).values              # largest RMS per step
        add(StabilityCheck("hidden RMS bounded", finite and rms.max().item() <= max_rms,
                           f"largest token RMS per step {[round(v, 2) for v in rms.tolist()]}, limit {max_rms:g}"))
        if out.hidden.shape[0] >= 3 and finite:
            changes = step_changes(out.hidden).flatten(1).mean(1)
            add(StabilityCheck("step changes shrink", changes[-1].item() < changes[0].item(),
                               f"mean ||Δh||/||h|| for t = 2..S: {[round(v, 3) for v in changes.tolist()]}",
                               required=False))
    if raise_on_failure:
        report.raise_if_failed()
    return report

# %% [markdown]
# The checks get tests of their own:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
from looplm.model import LoopOutput


def test_stability_checks():
    good = exit_distribution(torch.rand(4, 2, 3))
    assert check_exit_probs(good) < 1e-6
    with pytest.raises(ValueError, match="must sum to 1 over the steps"):
        check_exit_probs(good * 0.9)
    with pytest.raises(ValueError, match=r"exit_probs holds NaN or inf, first at index \[1, 0, 2\] \(step 2\)"):
        bad = good.clone()
        bad[1, 0, 2] = float("nan")
        check_exit_probs(bad)
    with pytest.raises(ValueError, match="negative"):
        check_exit_probs(torch.tensor([[1.5], [-0.5]]))
    hidden = torch.randn(4, 2, 3, 8)
    settling = torch.stack([torch.ones(1, 2, 4) * (2 - 0.5 ** t) for t in range(5)])   # changes shrink
    out = LoopOutput(logits=torch.zeros(5, 1, 2, 3), hidden=settling)
    report = stability_report(out)
    assert report.ok and all(c.passed for c in report.checks)
    exploding = LoopOutput(logits=torch.zeros(3, 1, 2, 3), hidden=torch.stack([torch.ones(1, 2, 4) * 10 ** (3 * t) for t in range(3)]))
    report = stability_report(exploding, max_rms=1e3)
    assert not report.ok and [c.name for c in report.checks if not c.passed] == ["hidden RMS bounded", "step changes shrink"]
    with pytest.raises(ValueError, match="stability checks failed: hidden RMS bounded"):
        stability_report(exploding, raise_on_failure=True)
    nan_logits = LoopOutput(logits=torch.full((2, 1, 1, 3), float("nan")))
    assert not stability_report(nan_logits).ok


run_tests(test_stability_checks)

# %% [markdown]
# ## C.9 The stored experiment behind section 5.7
#
# `python -m looplm.results run exit-recipe` runs it (Appendix B); chapter 5 loads what it
# stored.

# %% tags=["hide-input"]
#| export experiments
import copy

import torch

from looplm.adaptive import exit_entropy, expected_depth, q_exit_steps
from looplm.exits import (ConfidenceExit, FixedDepth, HiddenChangeExit, KLExit, QExit, exit_steps,
                          mean_steps, pick_exit_threshold, select_exit_logits)
from looplm.backprop import make_loop_loss
from looplm.data import IGNORE_INDEX, TASK_VOCAB, answer_accuracy, encode_examples, make_splits, make_task
from looplm.model import LinearExitGate, LoopLM, LoopLMConfig
from looplm.results import Experiment, register
from looplm.train import TrainConfig, Trainer, stage2_config, task_batches, train_stage1, train_stage2

# %%
#| export experiments
CH05_SPLITS = dict(task="stack", n_train=4000, n_test=300, max_difficulty=5, ood_max_difficulty=7, seed=0, n_val=300)
CH05_BUDGETS = (1.5, 2.0, 2.5, 4.0)   # mean steps per answer token; 4.0 = any


def ch05_rules():
    """Section 5.7's sweeps: rule name -> (which gate's record, the thresholds from stop-at-once to never)."""
    q_values = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
    return {
        "Q-exit, Stage II gate": ("stage2", [QExit(q) for q in q_values]),
        "Q-exit, Stage I gate": ("stage1", [QExit(q) for q in q_values]),
        "confidence": ("stage2", [ConfidenceExit(c) for c in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999)]),
        "KL (Huginn)": ("stage2", [KLExit(e) for e in (3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 5e-4)]),
        "hidden-state change": ("stage2", [HiddenChangeExit(e) for e in (2.0, 1.0, 0.7, 0.5, 0.4, 0.3, 0.1, 0.03)]),
        "fixed depth": ("stage2", [FixedDepth(n) for n in (1, 2, 3, 4)]),
    }


def rule_curves(records, targets):
    """For each rule of ch05_rules: sorted (mean steps, exact match) points. records: "stage1"/"stage2"
    -> LoopOutput with hidden states, on the examples whose targets are given."""
    mask = targets != IGNORE_INDEX
    curves = {}
    for name, (which, rules) in ch05_rules().items():
        points = []
        for rule in rules:
            steps = exit_steps(rule, records[which])
            correct = answer_accuracy(select_exit_logits(records[which].logits, steps), targets)
            points.append((mean_steps(steps, mask), correct.float().mean().item()))
        curves[name] = sorted(points)
    return curves


def best_at_budgets(points, budgets=CH05_BUDGETS):
    """The best exact match among points with mean steps <= each budget (None where none fits)."""
    return [max((a for s, a in points if s <= budget + 1e-9), default=None) for budget in budgets]


def _ch05_setup():
    task, splits = make_task("stack"), make_splits(**CH05_SPLITS)
    seq_len = task.max_seq_len(7)
    data = {name: encode_examples(getattr(splits, name), seq_len=seq_len) for name in ("test", "val", "ood")}
    return task, splits, seq_len, data


def _ch05_config(seed, steps):
    return TrainConfig(steps=steps, batch_size=32, lr=5e-3, min_lr=5e-4, warmup_steps=50, weight_decay=0.0,
                       eval_every=steps, seed=seed, progress=False)


def _ch05_model(seed, gate, seq_len):
    torch.manual_seed(seed)
    return LoopLM(LoopLMConfig(TASK_VOCAB.vocab_size, 64, 4, n_loops=4, exit_gate=gate, max_seq_len=seq_len))


@torch.no_grad()
def _per_step(model, data):
    return answer_accuracy(model(data.idx).logits, data.targets).float().mean(1).tolist()


@torch.no_grad()
def _gate_report(model, data):
    """On the test set: H(p), E[t], the exit mass per step, and Q-exit at the validation-picked q."""
    out, mask = model(data["test"].idx), data["test"].targets != IGNORE_INDEX
    count = mask.sum().item()
    q, _ = pick_exit_threshold(model, data["val"])
    steps = q_exit_steps(out.gate, q)
    correct = answer_accuracy(select_exit_logits(out.logits, steps), data["test"].targets)
    return {"entropy": (exit_entropy(out.exit_probs) * mask).sum().item() / count,
            "depth": (expected_depth(out.exit_probs) * mask).sum().item() / count,
            "mass": ((out.exit_probs * mask).sum((1, 2)) / count).tolist(),
            "q": q, "q_accuracy": correct.float().mean().item(), "q_steps": mean_steps(steps, mask)}


def _history_points(trainer, every=150):
    keys = ("entropy", "depth", "last_loss", *(f"mass_{t}" for t in range(1, 5)))
    return [{"step": r["step"], **{k: r[k] for k in keys}} for r in trainer.history
            if r["step"] == 1 or r["step"] % every == 0]


@torch.no_grad()
def _difficulty_and_budget(task, stage1_model, stage2_model, data, seq_len):
    """Section 5.7's other two measurements on one seed's models (Q-exit at q = 0.5)."""
    by_difficulty = []
    for difficulty in range(1, 8):
        batch = encode_examples(task.sample(200, difficulty, seed=f"depth/{difficulty}"), seq_len=seq_len)
        mask = batch.targets != IGNORE_INDEX
        row = {"difficulty": difficulty}
        for name, model in (("stage1", stage1_model), ("stage2", stage2_model)):
            out = model(batch.idx)
            steps = q_exit_steps(out.gate, 0.5)
            row[f"{name}_steps"] = ((steps * mask).sum(1) / mask.sum(1)).mean().item()
            row[f"{name}_accuracy"] = answer_accuracy(select_exit_logits(out.logits, steps),
                                                      batch.targets).float().mean().item()
        by_difficulty.append(row)
    by_budget = []
    for n_loops in range(1, 9):
        row = {"n_loops": n_loops}
        for split in ("test", "ood"):
            out = stage2_model(data[split].idx, n_loops=n_loops)
            steps = q_exit_steps(out.gate, 0.5)
            row[f"{split}_last"] = answer_accuracy(out.logits[-1], data[split].targets).float().mean().item()
            row[f"{split}_qexit"] = answer_accuracy(select_exit_logits(out.logits, steps),
                                                    data[split].targets).float().mean().item()
            row[f"{split}_steps"] = mean_steps(steps, data[split].targets != IGNORE_INDEX)
        by_budget.append(row)
    return by_difficulty, by_budget


def _two_stages(seed, batches, seq_len, data, warm_steps, last_weight):
    model = _ch05_model(seed, True, seq_len)
    stage1 = train_stage1(model, batches, _ch05_config(seed, 600), 0.1, warm_steps, last_weight)
    after_stage1 = copy.deepcopy(model)
    train_stage2(model, batches, stage2_config(_ch05_config(seed, 800), 200))
    record = {"test_per_step": _per_step(after_stage1, data["test"]), "history": _history_points(stage1),
              "stage1": _gate_report(after_stage1, data), "stage2": _gate_report(model, data)}
    return after_stage1, model, record


def _ch05_run(seed):
    task, splits, seq_len, data = _ch05_setup()
    batches = task_batches(splits.train, 32, seq_len)
    baseline = Trainer(_ch05_model(seed, False, seq_len), batches, _ch05_config(seed, 600))
    baseline.run()
    runs = {"baseline": {"test_per_step": _per_step(baseline.model, data["test"]),
                         "val_per_step": _per_step(baseline.model, data["val"])}}
    _, _, runs["eq4"] = _two_stages(seed, batches, seq_len, data, warm_steps=0, last_weight=0.0)
    weights = runs["eq4"]["history"][-1]
    weights = [weights[f"mass_{t}"] for t in range(1, 5)]            # where Eq. 4 put the mass at the end
    fixed = Trainer(_ch05_model(seed, False, seq_len), batches, _ch05_config(seed, 600),
                    loss_fn=make_loop_loss(step_weights=weights))
    fixed.run()
    runs["weights_only"] = {"weights": weights, "test_per_step": _per_step(fixed.model, data["test"])}
    stage1_model, stage2_model, runs["recipe"] = _two_stages(seed, batches, seq_len, data, warm_steps=300,
                                                             last_weight=0.5)
    with torch.no_grad():
        records = {"stage1": stage1_model(data["test"].idx, return_hidden=True),
                   "stage2": stage2_model(data["test"].idx, return_hidden=True)}
    curves = rule_curves(records, data["test"].targets)
    runs["recipe"]["budgets"] = {name: best_at_budgets(points) for name, points in curves.items()}
    runs["recipe"]["difficulty"], runs["recipe"]["loop_budget"] = _difficulty_and_budget(
        task, stage1_model, stage2_model, data, seq_len)
    return {"runs": runs, "prefix": [row["loss"] for row in baseline.history[:20]]}


def _ch05_prefix(seed, n_steps):
    task, splits, seq_len, _ = _ch05_setup()
    trainer = Trainer(_ch05_model(seed, False, seq_len), task_batches(splits.train, 32, seq_len),
                      _ch05_config(seed, 600))
    trainer.run(until=n_steps)
    return [row["loss"] for row in trainer.history]


EXIT_RECIPE = register(Experiment("exit-recipe", "05", "chapter 5: the baseline, Eq. 4 from the first update, "
                                  "its step weights alone, and the recipe; exit rules, depth and budgets",
                                  _ch05_run, _ch05_prefix))

# %% [markdown]
# ## C.10 Tests of the gate, the losses and the rules
#
# The tests repeat the checks of chapter 5's sections 5.1 to 5.5 on fresh random inputs, and
# pin the hand-computed values. They are exported to `tests/test_05a_appendix_adaptive.py`.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
import math

import pytest
import torch

from looplm.data import IGNORE_INDEX
from looplm.model import EXIT_GATES, LoopLM, LoopLMConfig


def _slow_exit_distribution(gates):
    probs, survive = [], 1.0
    for t, gate in enumerate(gates):
        probs.append(gate * survive if t < len(gates) - 1 else survive)
        survive *= 1.0 - gate
    return probs


def test_exit_distribution_matches_loop_and_sums_to_one():
    torch.manual_seed(0)
    for shape in ((1, 5), (2, 3), (4, 2, 6), (7, 1, 1, 3)):
        gates = torch.rand(shape, dtype=torch.float64)
        probs = exit_distribution(gates)
        assert probs.shape == gates.shape
        flat_g, flat_p = gates.reshape(shape[0], -1), probs.reshape(shape[0], -1)
        for i in range(flat_g.shape[1]):
            expected = torch.tensor(_slow_exit_distribution(flat_g[:, i].tolist()), dtype=torch.float64)
            torch.testing.assert_close(flat_p[:, i], expected, rtol=0, atol=1e-15)
        torch.testing.assert_close(probs.sum(0), torch.ones(shape[1:], dtype=torch.float64))
    by_hand = exit_distribution(torch.tensor([0.5, 0.5, 0.5, 0.9]))
    assert by_hand.tolist() == [0.5, 0.25, 0.125, 0.125]        # the last gate is not used
    assert exit_distribution(torch.tensor([0.3])).tolist() == [1.0]
    assert math.isclose(expected_depth(by_hand).item(), 1.875, abs_tol=1e-6)
    assert math.isclose(exit_entropy(torch.full((4,), 0.25)).item(), math.log(4), abs_tol=1e-6)
    assert exit_entropy(torch.tensor([0.0, 1.0, 0.0])).item() == 0.0


def test_linear_gate_is_registered_and_fills_the_output():
    assert EXIT_GATES["linear"] is LinearExitGate
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, n_loops=3, exit_gate=True))
    assert sum(p.numel() for p in model.exit_gate.parameters()) == 32 + 1
    out = model(torch.randint(0, 20, (2, 5)))
    assert out.gate.shape == out.exit_probs.shape == (3, 2, 5)
    assert out.gate.dtype == torch.float32 and ((out.gate > 0) & (out.gate < 1)).all()
    assert torch.equal(out.exit_probs, exit_distribution(out.gate))
    torch.testing.assert_close(out.exit_probs.sum(0), torch.ones(2, 5))
    # a float64 model's gate is computed in float64, against the formula
    model = model.double()
    idx = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        out = model(idx)
        z = model.readout(model.step(model.embed(idx), model.embed(idx), *model.rope(5)), *model.rope(5))[1]
    assert out.gate.dtype == out.exit_probs.dtype == torch.float64
    w, b = model.exit_gate.proj.weight[0], model.exit_gate.proj.bias[0]
    torch.testing.assert_close(out.gate[0], 1 / (1 + torch.exp(-(z @ w + b))), rtol=0, atol=1e-15)


run_tests(test_exit_distribution_matches_loop_and_sums_to_one, test_linear_gate_is_registered_and_fills_the_output)

# %% [markdown]
# The two training losses, against loops and hand-computed values. The Stage II test also
# checks the detaching: a loss that sends no gradient into the step losses.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def _slow_stage1(losses, probs, beta, mask):
    values = []
    for b in range(losses.shape[1]):
        for i in range(losses.shape[2]):
            if mask[b, i]:
                p = probs[:, b, i].tolist()
                expected = sum(q * l for q, l in zip(p, losses[:, b, i].tolist()))
                values.append(expected + beta * sum(q * math.log(q) for q in p if q > 0))
    return sum(values) / len(values)


def _slow_stage2(losses, gates, k, gamma, mask):
    total = 0.0
    for t in range(1, losses.shape[0]):
        terms = []
        for b in range(losses.shape[1]):
            for i in range(losses.shape[2]):
                if mask[b, i]:
                    improvement = max(0.0, losses[t - 1, b, i].item() - losses[t, b, i].item())
                    w = 1 / (1 + math.exp(-k * (improvement - gamma)))
                    lam = gates[t - 1, b, i].item()
                    terms.append(-(w * math.log(1 - lam) + (1 - w) * math.log(lam)))
        total += sum(terms) / len(terms)
    return total / losses.shape[0]


def test_stage1_loss_matches_loop_and_entropy_sign():
    torch.manual_seed(1)
    losses = torch.rand(4, 3, 5, dtype=torch.float64) * 3
    probs = exit_distribution(torch.rand(4, 3, 5, dtype=torch.float64))
    mask = torch.rand(3, 5) > 0.3
    for beta in (0.0, 0.05, 0.1, 1.0):
        got = stage1_loss(losses, probs, beta, mask).item()
        assert math.isclose(got, _slow_stage1(losses, probs, beta, mask), abs_tol=1e-12)
    everything = stage1_loss(losses, probs, 0.1)
    assert math.isclose(everything.item(), _slow_stage1(losses, probs, 0.1, torch.ones(3, 5, dtype=torch.bool)), abs_tol=1e-12)
    # the bonus lowers the loss of a spread distribution by exactly beta * H
    uniform = torch.full((4, 1), 0.25)
    step_losses = torch.tensor([[2.0], [1.0], [0.5], [0.25]])
    assert math.isclose(stage1_loss(step_losses, uniform, 0.0).item(), 0.9375, abs_tol=1e-6)
    drop = stage1_loss(step_losses, uniform, 0.0) - stage1_loss(step_losses, uniform, 0.1)
    assert math.isclose(drop.item(), 0.1 * math.log(4), abs_tol=1e-6)
    # and its gradient pushes a peaked distribution toward spreading out
    logits = torch.tensor([[3.0], [0.0], [0.0], [0.0]], requires_grad=True)
    stage1_loss(torch.zeros(4, 1), logits.softmax(0), 1.0).backward()
    assert logits.grad[0, 0] > 0 and (logits.grad[1:] < 0).all()


def test_stage2_gate_loss_matches_loop_and_detaches():
    torch.manual_seed(2)
    losses = (torch.rand(5, 2, 4, dtype=torch.float64) * 0.2).requires_grad_()
    gates = (torch.rand(5, 2, 4, dtype=torch.float64) * 0.98 + 0.01).requires_grad_()
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    for k, gamma in ((50.0, 0.005), (5.0, 0.1)):
        got = stage2_gate_loss(losses, gates, k, gamma, mask)
        assert math.isclose(got.item(), _slow_stage2(losses, gates, k, gamma, mask), abs_tol=1e-9)
    stage2_gate_loss(losses, gates).backward()
    assert losses.grad is None and gates.grad is not None
    assert (gates.grad[-1] == 0).all()                          # the last gate gets no label
    # by hand: one token, L = (1.0, 0.5), λ_1 = 0.2: I = 0.5, w = σ(50 (0.5 − 0.005))
    w = 1 / (1 + math.exp(-50 * 0.495))
    expected = -(w * math.log(0.8) + (1 - w) * math.log(0.2)) / 2
    got = stage2_gate_loss(torch.tensor([[1.0], [0.5]]), torch.tensor([[0.2], [0.7]]))
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    assert math.isclose(stage2_targets(torch.tensor([[0.3], [0.3]])).item(), 1 / (1 + math.exp(0.25)), rel_tol=1e-6)
    # saturated gates (exactly 0 and 1, as a float32 sigmoid gives past a logit of about 17):
    # a finite loss and a finite gradient
    logits = torch.tensor([[20.0, -120.0], [0.0, 0.0]], requires_grad=True)
    loss = stage2_gate_loss(torch.tensor([[1.0, 1.0], [0.5, 0.5]]), torch.sigmoid(logits))
    loss.backward()
    assert torch.sigmoid(logits)[0].tolist() == [1.0, 0.0]
    assert math.isfinite(loss.item()) and torch.isfinite(logits.grad).all()


def test_stage2_forward_runs_the_model_without_gradients():
    # called directly, with every parameter trainable (no gate_only): only the gate gets a graph,
    # and a backward pass leaves every other parameter's gradient empty
    torch.manual_seed(3)
    model = LoopLM(LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, n_loops=3, exit_gate=True))
    idx = torch.randint(0, 20, (2, 6))
    out = gate_on_detached_states(model, idx, targets=idx)
    assert not out.logits.requires_grad and not out.step_losses.requires_grad
    assert out.gate.requires_grad and out.exit_probs.requires_grad
    with torch.no_grad():
        reference = model(idx, targets=idx)
    assert torch.equal(out.gate.detach(), reference.gate) and torch.equal(out.step_losses, reference.step_losses)
    GateLoss()(model, idx, idx)[0].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("exit_gate."), name


run_tests(test_stage1_loss_matches_loop_and_entropy_sign, test_stage2_gate_loss_matches_loop_and_detaches,
          test_stage2_forward_runs_the_model_without_gradients)

# %% [markdown]
# Q-exit's edge cases and the other rules against hand-written loops:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def _slow_q_exit(gates, q, min_steps):
    cdf = 0.0
    for t, p in enumerate(_slow_exit_distribution(gates), start=1):
        cdf += p
        if cdf >= q and t >= min_steps:
            return t
    return len(gates)


def test_q_exit_steps_edge_cases():
    halves = torch.full((4, 1), 0.5)                            # CDF 0.5, 0.75, 0.875, 1
    assert [q_exit_steps(halves, q).item() for q in (0.5, 0.6, 0.75, 0.8, 0.9, 1.0)] == [1, 2, 2, 3, 4, 4]
    assert q_exit_steps(halves, 0.1, min_steps=3).item() == 3     # the floor is respected
    assert q_exit_steps(halves, 1.0, min_steps=2).item() == 4
    assert q_exit_steps(torch.full((4, 1), 0.01), 0.5).item() == 4   # never reached: S
    assert q_exit_steps(torch.tensor([[0.2], [1.0], [0.3]]), 1.0).item() == 2   # q = 1 needs CDF = 1
    assert q_exit_steps(torch.tensor([[0.7]]), 1.0).item() == 1      # one step: always step 1
    steps = q_exit_steps(torch.rand(3, 2, 5), 0.5)
    assert steps.dtype == torch.long and steps.shape == (2, 5) and steps.min() >= 1 and steps.max() <= 3
    torch.manual_seed(3)
    gates = torch.rand(6, 50, dtype=torch.float64)
    for q in (0.05, 0.5, 0.99, 1.0):
        for m in (1, 4, 6):
            got = q_exit_steps(gates, q, m)
            assert got.tolist() == [_slow_q_exit(gates[:, i].tolist(), q, m) for i in range(50)]
            assert torch.equal(exit_steps(QExit(q, m), gate=gates), got)


def test_other_rules_match_loops():
    torch.manual_seed(4)
    logits, hidden = torch.randn(5, 2, 3, 7) * 2, torch.randn(5, 2, 3, 8)
    probs = logits.softmax(-1)
    for b in range(2):
        for i in range(3):
            def first(condition, start=1):
                return next((t for t in range(start, 6) if condition(t)), 5)
            conf = first(lambda t: probs[t - 1, b, i].max() >= 0.6)
            kl = first(lambda t: (probs[t - 1, b, i] * (probs[t - 1, b, i] / probs[t - 2, b, i]).log()).sum() <= 0.5, 2)
            change = first(lambda t: (hidden[t - 1, b, i] - hidden[t - 2, b, i]).norm()
                           / hidden[t - 2, b, i].norm() <= 1.2, 2)
            assert confidence_exit_steps(logits, 0.6)[b, i] == conf
            assert kl_exit_steps(logits, 0.5)[b, i] == kl
            assert hidden_change_exit_steps(hidden, 1.2)[b, i] == change
    assert (exit_steps(FixedDepth(3), logits=logits) == 3).all()
    assert (exit_steps(ConfidenceExit(0.01, min_steps=4), logits=logits) == 4).all()
    assert (kl_exit_steps(logits, 1e9) == 2).all()              # a KL rule never stops at step 1
    assert (kl_exit_steps(logits[:1], 1e9) == 1).all()          # ... unless there is one step only
    assert make_exit_rule("kl", 0.1).threshold == 0.1 and set(EXIT_RULES) == {
        "q_exit", "confidence", "kl", "hidden_change", "fixed"}


def test_per_sequence_steps_and_select_exit_logits():
    gates = torch.tensor([[0.9, 0.1, 0.9], [0.1, 0.9, 0.1], [0.5, 0.5, 0.5]])[:, None, :]   # (S=3, B=1, T=3)
    token_steps = q_exit_steps(gates, 0.5)
    assert token_steps.tolist() == [[1, 2, 1]]
    mask = torch.tensor([[True, True, False]])
    assert exit_steps(QExit(0.5), gate=gates, per="sequence", mask=mask).tolist() == [[2, 2, 2]]
    everything = exit_steps(QExit(0.5), gate=gates, per="sequence")
    assert everything.tolist() == [[2, 2, 2]]
    # mean CDF over the masked tokens: step 1 (0.9 + 0.1) / 2 = 0.5 >= 0.5
    assert exit_steps(QExit(0.5), gate=gates, per="sequence", reduce="mean", mask=mask).tolist() == [[1, 1, 1]]
    assert exit_steps(QExit(0.6), gate=gates, per="sequence", reduce="mean", mask=mask).tolist() == [[2, 2, 2]]
    logits = torch.arange(3 * 2 * 2 * 4, dtype=torch.float32).view(3, 2, 2, 4)
    steps = torch.tensor([[1, 3], [2, 2]])
    picked = select_exit_logits(logits, steps)
    assert picked.shape == (2, 2, 4)
    for b in range(2):
        for i in range(2):
            assert torch.equal(picked[b, i], logits[steps[b, i] - 1, b, i])
    assert torch.equal(select_exit_logits(logits, torch.full((2, 2), 3)), logits[-1])
    assert mean_steps(steps) == 2.0 and mean_steps(steps, torch.tensor([[True, True], [False, False]])) == 2.0


run_tests(test_q_exit_steps_edge_cases, test_other_rules_match_loops, test_per_sequence_steps_and_select_exit_logits)

# %% [markdown]
# ## C.11 Bad input gets a clear error
#
# Chapter 5's section 5.9 shows a few mistakes the gate's functions catch; this test holds them
# all.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def test_bad_input_gets_clear_errors():
    torch.manual_seed(0)
    plain = LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2, n_loops=3))
    gated = LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2, n_loops=3, exit_gate=True))
    idx = torch.randint(0, 20, (2, 5))
    out = gated(idx, targets=idx)
    for q in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"q must be a number in \(0, 1\]"):
            q_exit_steps(out.gate, q)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        stage1_loss(out.step_losses, out.exit_probs, beta=-0.1)
    with pytest.raises(ValueError, match="must have the same shape"):
        stage1_loss(out.step_losses[:2], out.exit_probs, beta=0.1)
    with pytest.raises(ValueError, match="must have the same shape"):
        stage2_gate_loss(out.step_losses, out.gate[:, :1])
    with pytest.raises(ValueError, match="built without one"):
        q_exit_steps(plain(idx).gate, 0.5)
    with pytest.raises(ValueError, match="built without one"):
        exit_steps(QExit(0.5), plain(idx))
    with pytest.raises(ValueError, match="built without one"):
        AdaptiveLoss("stage1")(plain, idx, idx)
    with pytest.raises(ValueError, match="built without an exit gate"):
        with gate_only(plain):
            pass
    with pytest.raises(ValueError, match="unknown exit rule 'median'"):
        make_exit_rule("median", 0.5)


run_tests(test_bad_input_gets_clear_errors)
