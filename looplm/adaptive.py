# Generated from book/05_learning_when_to_stop.py, book/05a_appendix_adaptive.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['exit_distribution', 'exit_entropy', 'expected_depth', 'stage1_loss', 'AdaptiveLoss', 'Objective', 'OBJECTIVES', 'stage2_targets', 'stage2_gate_loss', 'gate_on_detached_states', 'GateLoss', 'gate_only', 'q_exit_steps', 'StepView', 'ExitRule', 'QExit', 'ConfidenceExit', 'KLExit', 'HiddenChangeExit', 'FixedDepth', 'EXIT_RULES', 'make_exit_rule', 'step_view', 'exit_steps', 'select_exit_logits', 'mean_steps', 'QEXIT_THRESHOLDS', 'pick_exit_threshold', 'confidence_exit_steps', 'kl_exit_steps', 'hidden_change_exit_steps', 'check_exit_probs', 'StabilityCheck', 'StabilityReport', 'stability_report']
# fmt: on

# --- book/05_learning_when_to_stop.py, cell 6 ---
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from looplm.data import IGNORE_INDEX, TASK_VOCAB, CharVocab, answer_accuracy
from looplm.diagnostics import hidden_norms, step_changes

# --- book/05_learning_when_to_stop.py, cell 16 ---
def _require_number(name, value, low=None, high=None, low_open=False, high_open=False):
    """ValueError unless `value` is a finite real number in the stated range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return float(value)


def _require_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


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

# --- book/05_learning_when_to_stop.py, cell 18 ---
def exit_distribution(gate):
    """p(t | x) from the exit gates: gate [S, ...] -> [S, ...], summing to 1 over the steps.

    p_t = λ_t ∏_{j<t} (1 − λ_j) for t < S and p_S = ∏_{j<S} (1 − λ_j): the last step takes
    the remaining mass, so the gate of step S is not used (Ouro, Eq. 3).
    """
    _check_gate(gate)
    survive = torch.cumprod(1 - gate[:-1], dim=0)               # S_1 .. S_{S-1}: (S-1, ...)
    reach = torch.cat([torch.ones_like(gate[:1]), survive])      # S_0 .. S_{S-1}: (S, ...)
    return torch.cat([gate[:-1] * reach[:-1], reach[-1:]])        # (S, ...)

# --- book/05_learning_when_to_stop.py, cell 22 ---
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

# --- book/05_learning_when_to_stop.py, cell 30 ---
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
    beta = _require_number("beta", beta, low=0)
    expected = (exit_probs * step_losses).sum(0)                # Σ_t p_t L_t: (...)
    return _token_mean(expected - beta * _entropy(exit_probs), mask)

# --- book/05_learning_when_to_stop.py, cell 38 ---
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

# --- book/05_learning_when_to_stop.py, cell 40 ---
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
    return {"beta": _require_number("beta", options["beta"], low=0),
            "last_weight": _require_number("last_weight", options["last_weight"], low=0, high=1)}


OBJECTIVES = {"stage1": Objective(_stage1_objective, {"beta": 0.1, "last_weight": 0.0}, _check_stage1)}

# --- book/05_learning_when_to_stop.py, cell 63 ---
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
    k = _require_number("k", k, low=0, low_open=True)
    gamma = _require_number("gamma", gamma)
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

# --- book/05_learning_when_to_stop.py, cell 69 ---
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


class GateLoss:
    """Stage II loss_fn(model, idx, targets) -> (loss, metrics): trains the exit gate only (Eq. 6)."""

    def __init__(self, k=50.0, gamma=0.005):
        self.k = _require_number("k", k, low=0, low_open=True)
        self.gamma = _require_number("gamma", gamma)

    def __call__(self, model, idx, targets):
        out = gate_on_detached_states(model, idx, targets)
        mask = targets != IGNORE_INDEX
        loss = stage2_gate_loss(out.step_losses, out.gate, self.k, self.gamma, mask)
        return loss, _exit_summary(out, mask)

    def __repr__(self):
        return f"GateLoss(k={self.k}, gamma={self.gamma})"

# --- book/05_learning_when_to_stop.py, cell 73 ---
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

# --- book/05_learning_when_to_stop.py, cell 85 ---
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
    _require_int("min_steps", min_steps, 1)
    if min_steps > n_steps:
        raise ValueError(f"min_steps={min_steps} is more than the S={n_steps} steps the gate covers")
    cdf = exit_distribution(gate).cumsum(0)                      # CDF_t: (S, ...)
    reached = cdf >= q
    reached[-1] = True                                            # the last step ends every token
    reached[: min_steps - 1] = False
    return reached.long().argmax(0) + 1                           # first True, counted from 1

# --- book/05_learning_when_to_stop.py, cell 95 ---
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

    def __init__(self, threshold, min_steps=1):
        self.threshold = self._check_threshold(threshold)
        self.min_steps = _require_int("min_steps", min_steps, 1)

    def _check_threshold(self, threshold):
        return _require_number("threshold", threshold)

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

# --- book/05_learning_when_to_stop.py, cell 97 ---
def _never_at_first_step(view, reference):
    return torch.full(view.token_shape, math.inf, device=reference.device)


class QExit(ExitRule):
    """Ouro's Q-exit: stop when the exit CDF reaches q (score: CDF of the steps so far)."""

    name, needs, stop_above = "q_exit", ("gates",), True

    def _check_threshold(self, q):
        return _check_q(q)

    def score(self, view):
        gates = view.gates.float()                                          # (t, ...)
        reach = torch.cat([torch.ones_like(gates[:1]), torch.cumprod(1 - gates[:-1], 0)])
        return (gates * reach).cumsum(0)[-1]      # Σ_{j<=t} p_j, as in q_exit_steps for t < S


class ConfidenceExit(ExitRule):
    """Stop when the top next-token probability reaches the threshold."""

    name, needs, stop_above = "confidence", ("logits",), True

    def _check_threshold(self, threshold):
        return _require_number("threshold", threshold, low=0, high=1, low_open=True)

    def score(self, view):
        return view.logits.float().softmax(-1).max(-1).values


class KLExit(ExitRule):
    """Huginn's rule: stop when KL(p_t || p_{t-1}) between successive predictions is <= eps."""

    name, needs, stop_above = "kl", ("logits",), False

    def __init__(self, threshold=5e-4, min_steps=1):
        super().__init__(threshold, min_steps)

    def _check_threshold(self, eps):
        return _require_number("eps", eps, low=0, low_open=True)

    def score(self, view):
        if view.prev_logits is None:
            return _never_at_first_step(view, view.logits)
        log_p, log_prev = view.logits.float().log_softmax(-1), view.prev_logits.float().log_softmax(-1)
        return (log_p.exp() * (log_p - log_prev)).sum(-1)


class HiddenChangeExit(ExitRule):
    """Stop when the relative change of the state ||h_t - h_{t-1}|| / ||h_{t-1}|| is <= eps."""

    name, needs, stop_above = "hidden_change", ("hidden",), False

    def __init__(self, threshold=0.03, min_steps=1):
        super().__init__(threshold, min_steps)

    def _check_threshold(self, eps):
        return _require_number("eps", eps, low=0, low_open=True)

    def score(self, view):
        if view.prev_hidden is None:
            return _never_at_first_step(view, view.hidden)
        h, prev = view.hidden.float(), view.prev_hidden.float()
        return (h - prev).norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-12)


class FixedDepth(ExitRule):
    """Stop every token at step n (score: the step itself)."""

    name, needs, stop_above = "fixed", (), True

    def _check_threshold(self, n):
        return _require_int("n", n, 1)

    def score(self, view):
        any_tensor = next(x for x in (view.logits, view.gates, view.hidden) if x is not None)
        return torch.full(view.token_shape, float(view.step), device=any_tensor.device)


EXIT_RULES = {rule.name: rule for rule in (QExit, ConfidenceExit, KLExit, HiddenChangeExit, FixedDepth)}


def make_exit_rule(name, *args, **kwargs):
    """The exit rule called `name` (a key of EXIT_RULES), built with the given threshold."""
    if name not in EXIT_RULES:
        raise ValueError(f"unknown exit rule {name!r}; valid rules: {', '.join(EXIT_RULES)}")
    return EXIT_RULES[name](*args, **kwargs)

# --- book/05_learning_when_to_stop.py, cell 99 ---
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

# --- book/05_learning_when_to_stop.py, cell 106 ---
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

# --- book/05_learning_when_to_stop.py, cell 108 ---
def confidence_exit_steps(logits, threshold=0.9, min_steps=1):
    """Steps used per token: first t with max softmax prob >= threshold, else S. [S, ..., V] -> [...]."""
    return exit_steps(ConfidenceExit(threshold, min_steps), logits=logits)


def kl_exit_steps(logits, eps=5e-4, min_steps=1):
    """Steps used per token: first t >= 2 with KL(p_t || p_{t-1}) <= eps (Huginn), else S."""
    return exit_steps(KLExit(eps, min_steps), logits=logits)


def hidden_change_exit_steps(hidden, eps=0.03, min_steps=1):
    """Steps used per token: first t >= 2 with ||h_t - h_{t-1}|| / ||h_{t-1}|| <= eps, else S."""
    return exit_steps(HiddenChangeExit(eps, min_steps), hidden=hidden)

# --- book/05a_appendix_adaptive.py, cell 12 ---
def check_exit_probs(exit_probs, tol=1e-4):
    """Raise ValueError unless exit_probs [S, ...] is finite, non-negative and sums to 1 over the
    steps within tol. Returns the largest |sum - 1|."""
    _require_steps("exit_probs", exit_probs, _NO_GATE)
    tol = _require_number("tol", tol, low=0)
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

# --- book/05a_appendix_adaptive.py, cell 14 ---
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
