from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 6.1 (ACT's halting weights). The reference walks one token's gates in
# a Python loop in float64, straight from the definition. Halting steps are compared exactly;
# weights and remainders to 1e-12. On random gates, a token whose running sum lies within 1e-9
# of 1 - eps at some step is left out (rounding may decide it either way).

import pytest  # noqa: E402
import torch  # noqa: E402


def slow_act(gates, eps):
    """-> (weights, N from 1, R) for one token's list of S gates."""
    total, n_halt = 0.0, len(gates)
    for n, h in enumerate(gates, start=1):
        total += h
        if total >= 1 - eps:
            n_halt = n
            break
    remainder = 1 - sum(gates[:n_halt - 1])
    weights = [gates[n - 1] if n < n_halt else (remainder if n == n_halt else 0.0) for n in range(1, len(gates) + 1)]
    return weights, n_halt, remainder


def test_hand_case():
    gate = torch.tensor([0.3, 0.5, 0.4, 0.9], dtype=torch.float64).view(4, 1)
    weights, n_halt, remainder = ex.act_halting(gate, eps=0.01)
    torch.testing.assert_close(weights.flatten(), torch.tensor([0.3, 0.5, 0.2, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert n_halt.dtype == torch.long and n_halt.tolist() == [3]
    assert abs(remainder.item() - 0.2) < 1e-12


def test_matches_a_slow_loop_on_random_gates():
    g = torch.Generator().manual_seed(0)
    gate = torch.rand(5, 3, 7, generator=g, dtype=torch.float64) * 0.6     # (S, B, T)
    checked = 0
    for eps in (0.0, 0.01, 0.2):
        weights, n_halt, remainder = ex.act_halting(gate, eps)
        assert weights.shape == gate.shape and n_halt.shape == remainder.shape == (3, 7)
        for b in range(3):
            for i in range(7):
                gates = gate[:, b, i].tolist()
                sums = [sum(gates[:n]) for n in range(1, 6)]
                if any(abs(s - (1 - eps)) < 1e-9 for s in sums):
                    continue
                expected, n, r = slow_act(gates, eps)
                assert n_halt[b, i].item() == n, (eps, b, i)
                assert abs(remainder[b, i].item() - r) < 1e-12
                torch.testing.assert_close(weights[:, b, i], torch.tensor(expected, dtype=torch.float64),
                                           rtol=0, atol=1e-12)
                checked += 1
    assert checked > 40


def test_weights_sum_to_one_and_the_last_gate_is_unused():
    g = torch.Generator().manual_seed(1)
    gate = torch.rand(6, 50, generator=g, dtype=torch.float64)
    weights, n_halt, _ = ex.act_halting(gate)
    torch.testing.assert_close(weights.sum(0), torch.ones(50, dtype=torch.float64), rtol=0, atol=1e-12)
    changed = gate.clone()
    changed[-1] = 1 - changed[-1]
    assert torch.equal(ex.act_halting(changed)[0], weights)
    never = torch.full((4, 2), 0.1, dtype=torch.float64)            # the budget is never spent: N = S
    weights, n_halt, remainder = ex.act_halting(never)
    assert n_halt.tolist() == [4, 4] and torch.allclose(remainder, torch.full((2,), 0.7, dtype=torch.float64))


def test_bad_input():
    gate = torch.full((3, 2), 0.5)
    for eps in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError):
            ex.act_halting(gate, eps)
    with pytest.raises(ValueError):
        ex.act_halting(torch.tensor([[1.5, 0.2]]))
    with pytest.raises(ValueError):
        ex.act_halting(torch.ones(3, 2, dtype=torch.long))
