# Generated from book/05_learning_when_to_stop.py, book/05a_appendix_adaptive.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['exit_distribution', 'exit_entropy', 'expected_depth', 'stage1_loss', 'stage2_targets', 'stage2_gate_loss', 'gate_on_detached_states', 'q_exit_steps', 'AdaptiveLoss', 'Objective', 'OBJECTIVES', 'GateLoss', 'gate_only', 'check_exit_probs', 'StabilityCheck', 'StabilityReport', 'stability_report']
# fmt: on

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from looplm.checks import require_int, require_number
from looplm.data import IGNORE_INDEX, TASK_VOCAB, CharVocab, answer_accuracy
from looplm.diagnostics import hidden_norms, step_changes
from looplm.model import _exit_distribution

# --- book/05_learning_when_to_stop.py:219 (cell 16) ---
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

# --- book/05_learning_when_to_stop.py:262 (cell 19) ---
def exit_distribution(gate):
    """p(t | x) from the exit gates: gate [S, ...] -> [S, ...], summing to 1 over the steps.

    p_t = λ_t ∏_{j<t} (1 − λ_j) for t < S and p_S = ∏_{j<S} (1 − λ_j): the last step takes
    the remaining mass, so the gate of step S is not used (Ouro, Eq. 3).
    """
    return _exit_distribution(_check_gate(gate))

# --- book/05_learning_when_to_stop.py:296 (cell 23) ---
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

# --- book/05_learning_when_to_stop.py:379 (cell 31) ---
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

# --- book/05_learning_when_to_stop.py:717 (cell 61) ---
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

# --- book/05_learning_when_to_stop.py:798 (cell 67) ---
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

# --- book/05_learning_when_to_stop.py:911 (cell 82) ---
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

# --- book/05a_appendix_adaptive.py:84 (cell 7) ---
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

# --- book/05a_appendix_adaptive.py:146 (cell 9) ---
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

# --- book/05a_appendix_adaptive.py:182 (cell 11) ---
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

# --- book/05a_appendix_adaptive.py:781 (cell 30) ---
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

# --- book/05a_appendix_adaptive.py:806 (cell 32) ---
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
