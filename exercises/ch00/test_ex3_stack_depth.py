from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 0.3 (how deep the stack ends). The reference is a measurement with the
# package: 5,000 programs per difficulty from StackTask().sample, their answer lengths, and the
# exact-match accuracy of an always-empty answer. With 5,000 draws a frequency has a standard
# error of at most 0.007, so probabilities must agree within 0.03 and means within 0.1.

import collections  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

from looplm.data import StackTask, exact_match  # noqa: E402

N_SAMPLES = 5000
DIFFICULTIES = (2, 5, 8, 12)
_samples = {}


def samples(difficulty):
    if difficulty not in _samples:
        _samples[difficulty] = StackTask().sample(N_SAMPLES, difficulty, seed=f"ex0.3/{difficulty}")
    return _samples[difficulty]


def test_matches_measured_answer_lengths():
    # every entry within 0.03 of the measured frequency of that answer length
    for d in DIFFICULTIES:
        probs = ex.final_depth_distribution(d)
        assert isinstance(probs, list) and len(probs) == d + 1, d
        assert all(type(p) is float for p in probs), d
        counts = collections.Counter(len(example.answer) for example in samples(d))
        for k, p in enumerate(probs):
            assert abs(p - counts[k] / N_SAMPLES) < 0.03, (d, k, p, counts[k] / N_SAMPLES)


def test_predicts_the_empty_answer_baseline_and_the_mean_length():
    # P(depth 0) is the exact match of a model that always answers "" (within 0.03); the mean
    # depth is the mean answer length (within 0.1)
    for d in DIFFICULTIES:
        probs = ex.final_depth_distribution(d)
        baseline = exact_match(lambda prompt: "", samples(d)).accuracy
        assert abs(probs[0] - baseline) < 0.03, (d, probs[0], baseline)
        mean_length = sum(len(example.answer) for example in samples(d)) / N_SAMPLES
        assert abs(sum(k * p for k, p in enumerate(probs)) - mean_length) < 0.1, d


def test_exact_small_cases_and_structure():
    # worked out by hand (to 1e-12): one push; then pop or push; parity; sums to 1
    assert ex.final_depth_distribution(1) == pytest.approx([0.0, 1.0], abs=1e-12)
    assert ex.final_depth_distribution(2) == pytest.approx([0.5, 0.0, 0.5], abs=1e-12)
    assert ex.final_depth_distribution(3) == pytest.approx([0.0, 0.75, 0.0, 0.25], abs=1e-12)
    for d in (4, 7, 30):
        probs = ex.final_depth_distribution(d)
        assert math.isclose(sum(probs), 1.0, abs_tol=1e-12), d
        assert all(p >= 0 for p in probs), d
        assert all(p == 0 for k, p in enumerate(probs) if (d - k) % 2), d  # depth has d's parity
        assert probs[d] == pytest.approx(0.5 ** (d - 1), abs=1e-15), d    # push, push, ... push


def test_bad_difficulties_raise_value_error():
    for bad in (0, -3, 2.0, True, "4", None):
        with pytest.raises(ValueError):
            ex.final_depth_distribution(bad)
