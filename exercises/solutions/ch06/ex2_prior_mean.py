"""Exercise 6.2: A prior with a given mean (reference solution).

The expected exit step of any distribution over 1..S is the sum of its survival probabilities,
E[t] = sum_{t=0}^{S-1} P(exit > t), and for the truncated prior P(exit > t) = (1 - lambda)^t, so

    E(lambda) = 1 + (1 - lambda) + ... + (1 - lambda)^(S-1) = (1 - (1 - lambda)^S) / lambda,

which falls from S (lambda -> 0) to 1 (lambda = 1). Bisection finds the lambda of a target mean.
"""

import math


def _mean(lam, n_steps):
    return sum((1 - lam) ** t for t in range(n_steps))


def lambda_for_mean_depth(mean_depth: float, n_steps: int) -> float:
    """The lambda_p whose geometric prior, truncated at n_steps steps, has mean mean_depth."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 2:
        raise ValueError(f"n_steps must be an int >= 2, got {n_steps!r}")
    if (isinstance(mean_depth, bool) or not isinstance(mean_depth, (int, float)) or not math.isfinite(mean_depth)
            or not 1 <= mean_depth < n_steps):
        raise ValueError(f"mean_depth must be a number in [1, {n_steps}), got {mean_depth!r}")
    low, high = 0.0, 1.0                                            # E(low) > target >= E(high)
    for _ in range(200):
        middle = (low + high) / 2
        if middle == 0.0 or _mean(middle, n_steps) > mean_depth:
            low = middle
        else:
            high = middle
    return high
