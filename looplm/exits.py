# Generated from book/05a_appendix_adaptive.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['StepView', 'ExitRule', 'QExit', 'ConfidenceExit', 'KLExit', 'HiddenChangeExit', 'FixedDepth', 'EXIT_RULES', 'make_exit_rule', 'step_view', 'exit_steps', 'select_exit_logits', 'mean_steps', 'QEXIT_THRESHOLDS', 'pick_exit_threshold', 'confidence_exit_steps', 'kl_exit_steps', 'hidden_change_exit_steps']
# fmt: on

import math
from dataclasses import dataclass

import torch

from looplm.adaptive import _NO_GATE, _check_gate, _check_q, _require_steps, _token_mean, q_exit_steps
from looplm.checks import require_int, require_number
from looplm.data import IGNORE_INDEX, answer_accuracy

# --- book/05a_appendix_adaptive.py:240 (cell 14) ---
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

# --- book/05a_appendix_adaptive.py:304 (cell 16) ---
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

# --- book/05a_appendix_adaptive.py:393 (cell 18) ---
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

# --- book/05a_appendix_adaptive.py:482 (cell 20) ---
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

# --- book/05a_appendix_adaptive.py:530 (cell 22) ---
def confidence_exit_steps(logits, threshold=0.9, min_steps=1):
    """Steps used per token: first t with max softmax prob >= threshold, else S. [S, ..., V] -> [...]."""
    return exit_steps(ConfidenceExit(threshold, min_steps), logits=logits)


def kl_exit_steps(logits, eps=5e-4, min_steps=1):
    """Steps used per token: first t >= 2 with KL(p_t || p_{t-1}) <= eps (Huginn), else S."""
    return exit_steps(KLExit(eps, min_steps), logits=logits)


def hidden_change_exit_steps(hidden, eps=0.03, min_steps=1):
    """Steps used per token: first t >= 2 with ||h_t - h_{t-1}|| / ||h_{t-1}|| <= eps, else S."""
    return exit_steps(HiddenChangeExit(eps, min_steps), hidden=hidden)
