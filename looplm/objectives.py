# Generated from book/06_other_ways_to_stop.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['act_halting', 'act_loss', 'geometric_prior', 'pondernet_loss', 'gumbel_exit_weights', 'gumbel_exit_loss']
# fmt: on

import math

import torch

from looplm.adaptive import (OBJECTIVES, _NO_GATE, Objective, _check_gate, _check_pair, _entropy,
                             _require_steps, _token_mean, exit_distribution)
from looplm.checks import require_int, require_number

# --- book/06_other_ways_to_stop.py:115 (cell 8) ---
def act_halting(gate, eps=0.01):
    """ACT's reading of the gates h_n = gate[n-1]: (weights [S, ...], N LongTensor [...], R [...]).

    N = first n with Σ_{j<=n} h_j >= 1 - eps (else S); R = 1 - Σ_{j<N} h_j; weights are h_n for
    n < N, R at n = N and 0 after, summing to 1.
    """
    _check_gate(gate)
    eps = require_number("eps", eps, low=0, high=1, high_open=True)
    halted = gate.cumsum(0) >= 1 - eps                                # (S, ...)
    halted[-1] = True
    n_halt = halted.long().argmax(0) + 1                              # N, from 1: (...)
    steps = torch.arange(1, gate.shape[0] + 1, device=gate.device).view(-1, *[1] * (gate.ndim - 1))
    before = steps < n_halt                                           # n < N: (S, ...)
    remainder = 1 - torch.where(before, gate, 0).sum(0)               # R: (...)
    weights = torch.where(before, gate, 0) + (steps == n_halt) * remainder
    return weights, n_halt, remainder


def act_loss(step_losses, gate, tau=0.01, eps=0.01, mask=None):
    """ACT (Graves 2016): mean over tokens of Σ_n w_n L_n + tau (N + R), the gates read as ACT does."""
    _require_steps("step_losses", step_losses, "model(idx, targets=...).step_losses")
    _check_gate(gate)
    _check_pair("step_losses", step_losses, "gate", gate)
    tau = require_number("tau", tau, low=0)
    weights, n_halt, remainder = act_halting(gate, eps)
    return _token_mean((weights * step_losses).sum(0) + tau * (n_halt + remainder), mask)

# --- book/06_other_ways_to_stop.py:170 (cell 12) ---
def geometric_prior(n_steps, lambda_p):
    """PonderNet's geometric prior over S steps, truncated like exit_distribution: [S]."""
    require_int("n_steps", n_steps, 1)
    lambda_p = require_number("lambda_p", lambda_p, low=0, high=1, low_open=True)
    return exit_distribution(torch.full((n_steps,), lambda_p, dtype=torch.float64)).float()


def pondernet_loss(step_losses, exit_probs, lambda_p=0.5, beta=0.01, mask=None):
    """PonderNet: mean over tokens of Σ_n p_n L_n + beta KL(p || geometric prior(lambda_p))."""
    _require_steps("step_losses", step_losses, "model(idx, targets=...).step_losses")
    _require_steps("exit_probs", exit_probs, _NO_GATE)
    _check_pair("step_losses", step_losses, "exit_probs", exit_probs)
    beta = require_number("beta", beta, low=0)
    prior = geometric_prior(exit_probs.shape[0], lambda_p).to(exit_probs)
    prior = prior.view(-1, *[1] * (exit_probs.ndim - 1))               # (S, 1, ...)
    kl = (exit_probs * (exit_probs.clamp_min(1e-12).log() - prior.log())).sum(0)
    return _token_mean((exit_probs * step_losses).sum(0) + beta * kl, mask)

# --- book/06_other_ways_to_stop.py:219 (cell 16) ---
def gumbel_exit_weights(exit_probs, tau=1.0, hard=True, generator=None):
    """A Gumbel-softmax sample of the exit step: [S, ...] weights summing to 1 over the steps.

    hard=True: one-hot in the forward pass, the soft sample's gradient in the backward pass.
    """
    _require_steps("exit_probs", exit_probs, _NO_GATE)
    tau = require_number("tau", tau, low=0, low_open=True)
    uniform = torch.rand(exit_probs.shape, generator=generator, dtype=exit_probs.dtype).to(exit_probs.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-10)))
    soft = ((exit_probs.clamp_min(1e-12).log() + gumbel) / tau).softmax(0)   # (S, ...)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(0, soft.argmax(0, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


def gumbel_exit_loss(step_losses, exit_probs, tau=1.0, hard=True, beta=0.0, mask=None, generator=None):
    """Mean over tokens of Σ_t y_t L_t − beta H(p), y a Gumbel-softmax sample of the exit step."""
    _require_steps("step_losses", step_losses, "model(idx, targets=...).step_losses")
    _require_steps("exit_probs", exit_probs, _NO_GATE)
    _check_pair("step_losses", step_losses, "exit_probs", exit_probs)
    beta = require_number("beta", beta, low=0)
    weights = gumbel_exit_weights(exit_probs, tau, hard, generator)
    return _token_mean((weights * step_losses).sum(0) - beta * _entropy(exit_probs), mask)

# --- book/06_other_ways_to_stop.py:264 (cell 20) ---
def _act_objective(out, mask, generator, tau, eps):
    return act_loss(out.step_losses, out.gate, tau, eps, mask), act_halting(out.gate, eps)[0]


def _pondernet_objective(out, mask, generator, lambda_p, beta):
    return pondernet_loss(out.step_losses, out.exit_probs, lambda_p, beta, mask), None


def _gumbel_objective(out, mask, generator, tau, hard, beta):
    return gumbel_exit_loss(out.step_losses, out.exit_probs, tau, hard, beta, mask, generator=generator), None


OBJECTIVES.update({
    "act": Objective(_act_objective, {"tau": 0.01, "eps": 0.01}),
    "pondernet": Objective(_pondernet_objective, {"lambda_p": 0.5, "beta": 0.01}),
    "gumbel": Objective(_gumbel_objective, {"tau": 1.0, "hard": True, "beta": 0.0, "seed": 0}, random=True),
})
