from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 5.4 (where Stage I sends the exit mass). The reference is the
# package's own Stage I: free exit gates (one logit per step per token) trained to convergence
# (damped Newton, float64) on looplm.adaptive.stage1_loss of exit_distribution(sigmoid(logits)),
# the losses held fixed, and the same loss's gradient at your distribution. Tolerances:
# distributions 1e-6 against the trained gates, the loss's gradient at your optimum 1e-9,
# entropies 1e-9 (relative) at your beta, 1e-6 for the trained gate at your beta.

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from looplm.adaptive import exit_distribution, exit_entropy, stage1_loss  # noqa: E402


def losses(seed, S=4, N=6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(S, N, generator=g, dtype=torch.float64) * 2


def minimise(loss_fn, x, max_iter=200):
    """Newton's method on a small parameter vector, damped (Levenberg-Marquardt) and with steps
    of at most 1 per coordinate, the Hessian from autograd."""
    x, damping, eye = x.detach().clone(), 1e-8, torch.eye(x.numel(), dtype=x.dtype)
    for _ in range(max_iter):
        x_ = x.clone().requires_grad_()
        value = loss_fn(x_)
        (grad,) = torch.autograd.grad(value, x_, create_graph=True)
        if grad.abs().max() < 1e-12:
            break
        hessian = torch.stack([torch.autograd.grad(grad[i], x_, retain_graph=True)[0] for i in range(x.numel())])
        for _ in range(60):
            step = torch.linalg.solve(hessian.detach() + damping * eye, -grad.detach())
            step = step * min(1.0, 1.0 / step.abs().max().item())
            if loss_fn(x + step) <= value.detach():
                x, damping = x + step, max(damping / 10, 1e-9)
                break
            damping *= 10
        else:
            break
    return x


def trained_exit_probs(step_losses, beta):
    """Where training free gates with the package's Stage I loss goes, the losses held fixed."""
    S, N = step_losses.shape

    def gates(x):                            # the last gate is never used: hold it at 1/2
        return torch.sigmoid(torch.cat([x.view(S - 1, N), torch.zeros(1, N, dtype=x.dtype)]))

    def loss(x):
        return stage1_loss(step_losses, exit_distribution(gates(x)), beta)

    return exit_distribution(gates(minimise(loss, torch.zeros((S - 1) * N, dtype=step_losses.dtype))))


def gate_logits_for(probs):
    """Gate logits whose exit distribution is probs (the inverse of Eq. 3; the last gate is unused)."""
    before = torch.cat([torch.zeros_like(probs[:1]), probs.cumsum(0)[:-1]])    # Σ_{j<t} p_j
    gates = (probs / (1 - before)).clamp(1e-15, 1 - 1e-15)
    gates[-1] = 0.5
    return torch.logit(gates)


def test_training_the_gate_goes_there():
    for seed, beta in ((0, 0.5), (1, 1.0), (2, 3.0)):
        step_losses = losses(seed)
        p = ex.stage1_optimum(step_losses, beta)
        assert p.shape == step_losses.shape and p.dtype == step_losses.dtype
        torch.testing.assert_close(p.sum(0), torch.ones(p.shape[1:], dtype=p.dtype))
        torch.testing.assert_close(p, trained_exit_probs(step_losses, beta), rtol=0, atol=1e-6)


def test_no_distribution_does_better():
    g = torch.Generator().manual_seed(5)
    for seed, beta in ((3, 0.2), (4, 0.5), (6, 2.0)):
        step_losses = losses(seed, S=5, N=4)
        p = ex.stage1_optimum(step_losses, beta)
        # the package's loss is flat at your p: zero gradient with respect to every used gate logit
        logits = gate_logits_for(p.detach()).requires_grad_()
        stage1_loss(step_losses, exit_distribution(torch.sigmoid(logits)), beta).backward()
        assert logits.grad[:-1].abs().max().item() < 1e-9, (seed, beta)
        best = stage1_loss(step_losses, p, beta).item()
        for _ in range(20):                               # and every other distribution costs more
            other = torch.softmax(torch.randn(p.shape, generator=g, dtype=p.dtype), 0)
            assert stage1_loss(step_losses, other, beta).item() > best


def test_entropy_as_beta_varies():
    step_losses = torch.tensor([[2.0], [1.0], [0.5], [0.25]], dtype=torch.float64)
    entropies = [exit_entropy(ex.stage1_optimum(step_losses, beta)).item() for beta in (0.01, 0.1, 0.3, 1, 3, 100)]
    assert all(a < b for a, b in zip(entropies, entropies[1:]))          # a larger bonus spreads the mass
    assert entropies[0] < 1e-6 and abs(entropies[-1] - math.log(4)) < 1e-3
    tied = torch.tensor([[1.0], [0.5], [0.5], [2.0]], dtype=torch.float64)
    assert abs(exit_entropy(ex.stage1_optimum(tied, 0.01)).item() - math.log(2)) < 1e-6
    # only the losses' differences over beta matter
    torch.testing.assert_close(ex.stage1_optimum(step_losses * 3 + 7, 0.6), ex.stage1_optimum(step_losses, 0.2))


def test_beta_for_entropy():
    for values, target in (([2.0, 1.0, 0.5, 0.25], 1.0), ([2.0, 1.0, 0.5, 0.25], 0.2),
                           ([0.3, 0.9, 0.1, 0.4, 0.2], 1.5), ([1.0, 0.5, 0.5, 2.0], 0.9)):
        step_losses = torch.tensor(values, dtype=torch.float64)
        beta = ex.beta_for_entropy(step_losses, target)
        assert isinstance(beta, float) and beta > 0, beta
        p = torch.softmax(-step_losses / beta, 0)
        assert math.isclose(exit_entropy(p).item(), target, rel_tol=1e-9), (values, target, beta)
    # the gate the package's Stage I trains at that beta has that entropy
    step_losses = torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    beta = ex.beta_for_entropy(step_losses, 1.0)
    trained = trained_exit_probs(step_losses[:, None], beta)
    assert abs(exit_entropy(trained).item() - 1.0) < 1e-6


def test_impossible_requests_are_refused():
    step_losses = torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            ex.stage1_optimum(step_losses, bad)
    with pytest.raises(ValueError):
        ex.stage1_optimum(torch.tensor([1, 2, 3]), 0.1)               # integer losses
    for target in (0.0, -0.1, math.log(4), 2.0):
        with pytest.raises(ValueError):
            ex.beta_for_entropy(step_losses, target)
    with pytest.raises(ValueError):                                     # two best steps: H > log 2
        ex.beta_for_entropy(torch.tensor([1.0, 0.5, 0.5, 2.0], dtype=torch.float64), 0.5)
    with pytest.raises(ValueError):
        ex.beta_for_entropy(step_losses[:, None], 1.0)                  # not one token's losses
