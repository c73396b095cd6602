from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 3.2 (warmup-cosine schedule). References: the value at the key steps
# worked out by hand, an independent formulation (cos^2 of half the angle), and the package's
# looplm.train.lr_at. Floats are compared with a relative tolerance of 1e-9.

import math  # noqa: E402

import pytest  # noqa: E402

from looplm.train import TrainConfig, lr_at  # noqa: E402


def cos_squared_reference(s, n, w, max_lr, min_lr):
    """0.5 (1 + cos a) = cos^2(a / 2): the same schedule written another way."""
    if s < w:
        return max_lr * s / w
    p = min(1.0, (s - w) / (n - w))
    return min_lr + (max_lr - min_lr) * math.cos(math.pi * p / 2) ** 2


def test_key_steps():
    # N=100, W=10, max 1e-2, min 1e-3: worked out by hand
    f = lambda s: ex.warmup_cosine(s, 100, 10, 1e-2, 1e-3)
    assert f(0) == 0.0
    assert math.isclose(f(5), 5e-3, rel_tol=1e-9) and math.isclose(f(10), 1e-2, rel_tol=1e-9)
    assert math.isclose(f(55), 1e-3 + 0.5 * 9e-3, rel_tol=1e-9)          # half way down: the mean
    assert math.isclose(f(100), 1e-3, rel_tol=1e-9) and math.isclose(f(150), 1e-3, rel_tol=1e-9)
    assert isinstance(f(37), float)


def test_matches_two_references_at_every_step():
    # every step 0..N+5 for several (N, W, max, min), including W = 0 and min = 0
    for n, w, max_lr, min_lr in ((100, 10, 1e-2, 1e-3), (50, 0, 3e-3, 0.0), (7, 6, 1.0, 0.5), (1, 0, 2.0, 1.0)):
        config = TrainConfig(steps=n, warmup_steps=w, lr=max_lr, min_lr=min_lr)
        for s in range(n + 6):
            got = ex.warmup_cosine(s, n, w, max_lr, min_lr)
            assert math.isclose(got, cos_squared_reference(s, n, w, max_lr, min_lr), rel_tol=1e-9, abs_tol=1e-15), (n, w, s)
            assert math.isclose(got, lr_at(s, config), rel_tol=1e-9, abs_tol=1e-15), (n, w, s)


def test_rises_then_falls():
    # strictly increasing during warmup, non-increasing after, continuous at W
    values = [ex.warmup_cosine(s, 300, 30, 3e-3, 3e-4) for s in range(301)]
    assert all(a < b for a, b in zip(values[:30], values[1:31]))
    assert all(a >= b for a, b in zip(values[30:], values[31:]))
    assert max(values) == values[30] == pytest.approx(3e-3)
    assert abs(values[30] - values[29]) < 2e-4 and abs(values[31] - values[30]) < 2e-4


def test_bad_arguments_raise_value_error():
    good = dict(step=3, total_steps=10, warmup_steps=2, max_lr=1e-3, min_lr=1e-4)
    for change in (dict(step=-1), dict(step=2.5), dict(total_steps=0), dict(warmup_steps=10),
                   dict(warmup_steps=-1), dict(max_lr=0.0), dict(min_lr=2e-3), dict(min_lr=-1e-4)):
        with pytest.raises(ValueError):
            ex.warmup_cosine(**{**good, **change})
