from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 6.2 (a truncated geometric prior with a given mean). The reference is
# the package's own measurement: the exit distribution of a constant gate lambda_p over n_steps
# steps (chapter 5's exit_distribution, in float64) and its expected exit step. Means agree to
# 1e-6.

import pytest  # noqa: E402
import torch  # noqa: E402

from looplm.adaptive import exit_distribution  # noqa: E402


def measured_mean(lam, n_steps):
    probs = exit_distribution(torch.full((n_steps,), lam, dtype=torch.float64))
    return (probs * torch.arange(1, n_steps + 1, dtype=torch.float64)).sum().item()


def test_the_means_are_met():
    for n_steps in (2, 4, 8):
        for target in (1.0, 1.2, 1.875, 2.0, n_steps - 0.5):
            if target >= n_steps:
                continue
            lam = ex.lambda_for_mean_depth(target, n_steps)
            assert isinstance(lam, float) and 0 < lam <= 1, (target, n_steps)
            assert abs(measured_mean(lam, n_steps) - target) < 1e-6, (target, n_steps, lam)


def test_known_values():
    assert abs(ex.lambda_for_mean_depth(1.875, 4) - 0.5) < 1e-6     # section 6.2's prior
    assert abs(ex.lambda_for_mean_depth(1.0, 4) - 1.0) < 1e-6
    # a deeper target needs a smaller lambda
    assert ex.lambda_for_mean_depth(3.0, 4) < ex.lambda_for_mean_depth(2.0, 4) < 0.5


def test_impossible_targets_are_refused():
    for target, n_steps in ((4.0, 4), (0.5, 4), (5.0, 4), (float("nan"), 4), (2.0, 1), (2.0, 2.5), (True, 4)):
        with pytest.raises(ValueError):
            ex.lambda_for_mean_depth(target, n_steps)
