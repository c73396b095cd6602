from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 5.2 (the Q-exit rule). The reference walks one token's steps in a
# Python loop, in float64, adding up p_t and stopping at the first step that qualifies. Steps are
# integers and compared exactly; on random gates, a token whose CDF lies within 1e-9 of q at
# some step is left out (rounding may decide it either way). Hand cases use gates whose CDFs are
# exact in binary.

import pytest  # noqa: E402
import torch  # noqa: E402


def slow_q_exit(gates, q, min_steps=1):
    """-> (exit step counted from 1, the token's CDF values) for one token's list of S gates."""
    cdf, survive, cdfs = 0.0, 1.0, []
    for t, gate in enumerate(gates, start=1):
        p = gate * survive if t < len(gates) else survive
        survive *= 1.0 - gate
        cdf += p
        cdfs.append(cdf)
    for t, value in enumerate(cdfs, start=1):
        if value >= q and t >= min_steps:
            return t, cdfs
    return len(gates), cdfs


def test_matches_a_slow_loop_on_random_gates():
    g = torch.Generator().manual_seed(0)
    gate = torch.rand(6, 5, 8, generator=g, dtype=torch.float64)     # (S, B, T)
    checked = 0
    for q in (0.1, 0.3, 0.5, 0.77, 0.9, 0.99, 1.0):
        for min_steps in (1, 2, 4, 6):
            steps = ex.q_exit_steps(gate, q, min_steps)
            assert steps.shape == (5, 8) and steps.dtype == torch.long, (q, min_steps)
            for b in range(5):
                for i in range(8):
                    expected, cdfs = slow_q_exit(gate[:, b, i].tolist(), q, min_steps)
                    if any(abs(c - q) < 1e-9 for c in cdfs[:-1]):
                        continue
                    assert steps[b, i].item() == expected, (q, min_steps, b, i)
                    checked += 1
    assert checked > 1000


def test_hand_cases():
    # every gate 1/2 over 4 steps: CDF = 0.5, 0.75, 0.875, 1
    halves = torch.full((4, 1), 0.5)
    for q, min_steps, step in [(0.5, 1, 1), (0.25, 1, 1), (0.6, 1, 2), (0.75, 1, 2), (0.8, 1, 3),
                               (0.875, 1, 3), (0.9, 1, 4), (1.0, 1, 4), (0.5, 3, 3), (0.1, 4, 4),
                               (0.8, 2, 3)]:
        assert ex.q_exit_steps(halves, q, min_steps).tolist() == [step], (q, min_steps)
    # three tokens side by side; a gate of exactly 1 at step 2 ends the second token there even at q = 1
    gate = torch.tensor([[0.25, 0.25, 0.0], [0.5, 1.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    assert ex.q_exit_steps(gate, 0.5).tolist() == [2, 2, 4]          # CDFs .625 / 1 / 0 at step 2
    assert ex.q_exit_steps(gate, 1.0).tolist() == [4, 2, 4]
    assert ex.q_exit_steps(gate, 0.25).tolist() == [1, 1, 4]
    assert ex.q_exit_steps(torch.tensor([[0.3, 0.0]]), 1.0).tolist() == [1, 1]   # S = 1


def test_the_last_step_always_ends_a_token():
    # float32 gates: the rounded CDF at step S often lands just below 1, yet q = 1 must give S
    g = torch.Generator().manual_seed(1)
    gate = torch.rand(7, 4000, generator=g) * 0.9 + 0.05
    assert (ex.q_exit_steps(gate, 1.0) == 7).all()
    assert (ex.q_exit_steps(torch.zeros(5, 3), 0.999) == 5).all()        # gates of 0: never earlier
    steps = ex.q_exit_steps(gate, 0.6, min_steps=3)
    assert ((steps >= 3) & (steps <= 7)).all()


def test_rejects_bad_q_and_min_steps():
    gate = torch.full((4, 2), 0.5)
    for q in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError):
            ex.q_exit_steps(gate, q)
    for min_steps in (0, -1, 5, 2.5):
        with pytest.raises(ValueError):
            ex.q_exit_steps(gate, 0.5, min_steps)
    with pytest.raises(ValueError):
        ex.q_exit_steps(torch.tensor([[0.5, 1.2], [0.5, 0.5]]), 0.5)
