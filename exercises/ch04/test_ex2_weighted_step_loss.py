from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 4.2 (the weighted per-step loss). The reference is written with
# Python loops over steps and positions, in float64. Tolerance: relative 1e-6.

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

IGNORE = -100


def reference(step_losses, targets, raw_weights):
    S, B, T = step_losses.shape
    cells = [(b, i) for b in range(B) for i in range(T) if targets[b, i] != IGNORE]
    means = [sum(float(step_losses[t, b, i]) for b, i in cells) / len(cells) for t in range(S)]
    return sum(w * m for w, m in zip(raw_weights, means)) / sum(raw_weights)


def make(seed, S=4, B=3, T=5):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 9, (B, T), generator=g)
    targets[0, :3] = IGNORE
    targets[2, 4] = IGNORE
    step_losses = torch.rand(S, B, T, generator=g) * 3      # not zero at ignored positions
    return step_losses, targets


def test_explicit_weights_are_normalised():
    step_losses, targets = make(0)
    for raw in ([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 5.0], torch.tensor([2.0, 0.5, 0.0, 1.5])):
        got = ex.weighted_loss(step_losses, targets, raw).item()
        assert math.isclose(got, reference(step_losses, targets, [float(w) for w in raw]), rel_tol=1e-6)


def test_named_schemes():
    step_losses, targets = make(1, S=5)
    for name, raw in [("last", [0, 0, 0, 0, 1]), ("uniform", [1] * 5), ("linear", [1, 2, 3, 4, 5])]:
        got = ex.weighted_loss(step_losses, targets, name).item()
        assert math.isclose(got, reference(step_losses, targets, raw), rel_tol=1e-6), name


def test_gradient_reaches_only_learned_positions():
    step_losses, targets = make(2)
    step_losses.requires_grad_(True)
    ex.weighted_loss(step_losses, targets, [1.0, 1.0, 1.0, 1.0]).backward()
    learned = targets != IGNORE
    expected = torch.where(learned, 1.0 / (4 * learned.sum()), 0.0).expand(4, -1, -1)
    torch.testing.assert_close(step_losses.grad, expected)


def test_bad_weights_are_refused():
    step_losses, targets = make(3)
    for bad in ([1.0, 1.0, 1.0], [1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0],
                [1.0, float("nan"), 1.0, 1.0], "exponential"):
        with pytest.raises(ValueError):
            ex.weighted_loss(step_losses, targets, bad)
    with pytest.raises(ValueError):
        ex.weighted_loss(step_losses, torch.full_like(targets, IGNORE), "uniform")
