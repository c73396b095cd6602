from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 5.1 (the exit distribution). The reference is the definition written
# as a Python loop over one token's gates, in float64: values agree to an absolute 1e-12, and the
# gradients (through the same loop on torch scalars) to an absolute 1e-12. A hand-worked case is
# compared exactly (its numbers are exact in binary).

import pytest  # noqa: E402
import torch  # noqa: E402


def slow_distribution(gates):
    """p(t | x) for one token from its list of S gates (floats or 0-d tensors)."""
    probs, survive = [], 1.0
    for t, gate in enumerate(gates):
        if t < len(gates) - 1:
            probs.append(gate * survive)        # stop at step t + 1, having survived steps 1..t
            survive = survive * (1.0 - gate)
        else:
            probs.append(survive)               # the last step takes what is left
    return probs


def random_gates(seed, shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype)


def test_matches_a_slow_loop_on_random_gates():
    for seed, shape in [(0, (5, 3, 4)), (1, (1, 6)), (2, (2, 7)), (3, (8, 10)), (4, (3,))]:
        gate = random_gates(seed, shape)
        p = ex.exit_distribution(gate)
        assert p.shape == gate.shape and p.dtype == gate.dtype, shape
        flat_gate, flat_p = gate.reshape(shape[0], -1), p.reshape(shape[0], -1)
        for i in range(flat_gate.shape[1]):
            expected = torch.tensor(slow_distribution(flat_gate[:, i].tolist()), dtype=torch.float64)
            torch.testing.assert_close(flat_p[:, i], expected, rtol=0, atol=1e-12)


def test_sums_to_one_and_ignores_the_last_gate():
    gate = random_gates(5, (6, 4, 5))
    p = ex.exit_distribution(gate)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(0), torch.ones(4, 5, dtype=torch.float64), rtol=0, atol=1e-12)
    other_last = gate.clone()
    other_last[-1] = 1.0 - gate[-1]                 # λ_S plays no part
    torch.testing.assert_close(ex.exit_distribution(other_last), p, rtol=0, atol=0)
    single = ex.exit_distribution(torch.tensor([[0.3, 0.9]]))   # S = 1: all mass on step 1
    torch.testing.assert_close(single, torch.ones(1, 2), rtol=0, atol=0)


def test_hand_computed():
    # all gates 1/2 over 4 steps: 1/2, 1/4, 1/8 and the remaining 1/8
    p = ex.exit_distribution(torch.full((4,), 0.5))
    assert p.tolist() == [0.5, 0.25, 0.125, 0.125]
    # a gate of 1 stops every token there; a gate of 0 never stops it (until the last step)
    p = ex.exit_distribution(torch.tensor([[0.0, 0.25], [1.0, 0.5], [0.5, 0.0], [0.0, 0.0]]))
    assert p.tolist() == [[0.0, 0.25], [1.0, 0.375], [0.0, 0.0], [0.0, 0.375]]


def test_gradient_flows_to_the_gate():
    gate = random_gates(6, (5, 3)).requires_grad_()
    weights = random_gates(7, (5, 3))
    (ex.exit_distribution(gate) * weights).sum().backward()
    assert gate.grad is not None

    reference = torch.zeros(5, 3, dtype=torch.float64)
    for i in range(3):
        token = [gate[t, i].detach().clone().requires_grad_() for t in range(5)]
        sum(w * p for w, p in zip(weights[:, i].tolist(), slow_distribution(token))).backward()
        reference[:, i] = torch.stack([x.grad if x.grad is not None else torch.zeros((), dtype=torch.float64)
                                       for x in token])
    torch.testing.assert_close(gate.grad, reference, rtol=0, atol=1e-12)
    assert (gate.grad[-1] == 0).all()              # λ_S is not used


def test_rejects_bad_gates():
    bad = [
        torch.empty(0, 3),                         # no steps
        torch.tensor(0.5),                         # no step dimension
        torch.tensor([[1, 0], [0, 1]]),            # integers
        torch.tensor([0.5, -0.1, 0.2]),            # below 0
        torch.tensor([0.5, 1.5, 0.2]),             # above 1
        torch.tensor([0.5, float("nan"), 0.2]),    # NaN
    ]
    for gate in bad:
        with pytest.raises(ValueError):
            ex.exit_distribution(gate)
