from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 5.5 (which gate Stage II teaches). The reference is the package's
# own Stage II: free gate logits trained to convergence (Newton's method, float64) on
# looplm.adaptive.stage2_gate_loss, the step losses held fixed; for the printed pairing the same
# loss applied to the gates moved one step earlier, so that w_t meets λ_t. Tolerance: 1e-6 on
# every gate and on the expected exit step.

import pytest  # noqa: E402
import torch  # noqa: E402

from looplm.adaptive import exit_distribution, expected_depth, stage2_gate_loss  # noqa: E402


def make(seed, S=4, N=5):
    g = torch.Generator().manual_seed(seed)
    losses = 1.0 - torch.rand(S, N, generator=g, dtype=torch.float64).mul(0.06).cumsum(0)  # falling by 0 to 0.06
    losses[1, 0] += 0.2                                          # a step that makes things worse
    gate = torch.rand(S, N, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return losses, gate


def trained_gates(step_losses, gate, pairing, k=50.0, gamma=0.005, max_iter=100):
    """Stage II with the package's loss, trained to convergence from `gate`.

    Every gate is its own parameter and appears in one term of the loss at most, so the
    Hessian in the logits is diagonal: Newton's method runs coordinate by coordinate (steps of
    at most 2, since each term is convex in its logit).
    """
    logits = torch.logit(gate).detach().clone()

    def loss_of(logits):
        lam = torch.sigmoid(logits)
        if pairing == "paper":               # row t - 1 holds λ_t: the loss pairs w_t with λ_t
            lam = torch.cat([lam[1:], lam[:1]])
        return stage2_gate_loss(step_losses, lam, k, gamma)

    for _ in range(max_iter):
        x = logits.clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
        if grad.abs().max() < 1e-14:
            break
        (curvature,) = torch.autograd.grad(grad.sum(), x)      # the Hessian's diagonal
        step = torch.where(curvature > 0, -grad.detach() / curvature.clamp_min(1e-300), 0.0)
        logits = logits + step.clamp(-2.0, 2.0)
    return torch.sigmoid(logits)


@pytest.mark.parametrize("pairing", ["book", "paper"])
def test_matches_training_with_the_package_loss(pairing):
    for seed, (k, gamma) in enumerate([(50.0, 0.005), (10.0, 0.02)]):
        losses, gate = make(seed)
        got = ex.stage2_trained_gates(losses, gate, pairing, k, gamma)
        assert got.shape == gate.shape and got.dtype == gate.dtype
        torch.testing.assert_close(got, trained_gates(losses, gate, pairing, k, gamma), rtol=0, atol=1e-6)


def test_which_gates_stay_untrained():
    losses, gate = make(3)
    kept_losses, kept_gate = losses.clone(), gate.clone()
    book = ex.stage2_trained_gates(losses, gate)                 # the default pairing is the book's
    paper = ex.stage2_trained_gates(losses, gate, "paper")
    assert torch.equal(book[-1], gate[-1]) and not torch.allclose(book[0], gate[0])
    assert torch.equal(paper[0], gate[0]) and not torch.allclose(paper[-1], gate[-1])
    # both pairings learn the same values, one step apart
    torch.testing.assert_close(book[:-1], paper[1:], rtol=0, atol=1e-12)
    assert torch.equal(losses, kept_losses) and torch.equal(gate, kept_gate)   # inputs not modified


def test_the_worked_example():
    losses = torch.tensor([[1.0], [0.4], [0.39], [0.39]], dtype=torch.float64)
    gate = torch.full((4, 1), 0.5, dtype=torch.float64)
    for pairing in ("book", "paper"):
        mine = expected_depth(exit_distribution(ex.stage2_trained_gates(losses, gate, pairing))).item()
        reference = expected_depth(exit_distribution(trained_gates(losses, gate, pairing))).item()
        assert abs(mine - reference) < 1e-6, (pairing, mine, reference)


def test_rejects_bad_input():
    losses, gate = make(4)
    for args, options in (((losses, gate, "middle"), {}), ((losses, gate[:, :3]), {}),
                          ((losses[:1], gate[:1]), {}), ((losses, gate * 0), {}), ((losses, gate + 1), {})):
        with pytest.raises(ValueError):
            ex.stage2_trained_gates(*args, **options)
