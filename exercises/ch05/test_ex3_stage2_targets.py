from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 5.3 (the Stage II targets and gate loss). The reference is Eqs. 5-6
# written with Python loops over steps and tokens, in float64 with the math module; hand-worked
# cases use the formula on one token. The gate's gradient is checked against its closed form,
# dBCE/dλ = w / (1 - λ) - (1 - w) / λ. Tolerances: relative 1e-9 (absolute 1e-12) in float64.

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def slow_loss(step_losses, gate, k, gamma, mask=None):
    """Eqs. 5-6 one token at a time: [S, B, T] losses and gates, [B, T] bool mask (None: all)."""
    S, B, T = step_losses.shape
    total = 0.0
    for t in range(1, S):                                  # step t + 1 = 2..S, counted from 1
        terms = []
        for b in range(B):
            for i in range(T):
                if mask is None or mask[b, i]:
                    improvement = max(0.0, float(step_losses[t - 1, b, i]) - float(step_losses[t, b, i]))
                    w = sigmoid(k * (improvement - gamma))
                    stop = float(gate[t - 1, b, i])
                    terms.append(-(w * math.log(1.0 - stop) + (1.0 - w) * math.log(stop)))
        total += sum(terms) / len(terms)
    return total / S


def make(seed, S=4, B=3, T=5):
    g = torch.Generator().manual_seed(seed)
    losses = torch.rand(S, B, T, generator=g, dtype=torch.float64) * 0.3   # improvements near gamma
    gate = torch.rand(S, B, T, generator=g, dtype=torch.float64) * 0.96 + 0.02
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0, 0] = True
    return losses, gate, mask


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_matches_a_slow_loop():
    for seed, (S, B, T) in enumerate([(4, 3, 5), (2, 2, 3), (6, 1, 7)]):
        losses, gate, mask = make(seed, S, B, T)
        for k, gamma in [(50.0, 0.005), (10.0, 0.05), (1.0, -0.1)]:
            got = ex.stage2_gate_loss(losses, gate, k, gamma)
            assert got.ndim == 0
            assert close(got.item(), slow_loss(losses, gate, k, gamma)), (seed, k, gamma)
            got = ex.stage2_gate_loss(losses, gate, k, gamma, mask)
            assert close(got.item(), slow_loss(losses, gate, k, gamma, mask)), (seed, k, gamma, "mask")
    losses, gate, _ = make(9)
    assert close(ex.stage2_gate_loss(losses, gate).item(), slow_loss(losses, gate, 50.0, 0.005))  # defaults


def test_hand_computed():
    # S = 2, one token. λ_1 = 1/2: the BCE is log 2 whatever the target; divided by S = 2
    got = ex.stage2_gate_loss(torch.tensor([[1.0], [0.5]], dtype=torch.float64),
                              torch.tensor([[0.5], [0.9]], dtype=torch.float64))
    assert close(got.item(), math.log(2) / 2)
    # S = 3: step 2 improves by 0.5 (w = σ(50 · 0.495)), step 3 not at all (w = σ(-0.25))
    losses = torch.tensor([[1.0], [0.5], [0.7]], dtype=torch.float64)
    gate = torch.tensor([[0.5], [0.25], [0.8]], dtype=torch.float64)
    w3 = sigmoid(-0.25)
    expected = (math.log(2) - (w3 * math.log(0.75) + (1 - w3) * math.log(0.25))) / 3
    assert close(ex.stage2_gate_loss(losses, gate).item(), expected)
    # a big improvement wants "continue": a small λ_1 is cheap, a large one is dear
    losses = torch.tensor([[2.0], [0.0]], dtype=torch.float64)
    w = sigmoid(50 * (2.0 - 0.005))
    for stop in (0.1, 0.9):
        expected = -(w * math.log(1 - stop) + (1 - w) * math.log(stop)) / 2
        got = ex.stage2_gate_loss(losses, torch.tensor([[stop], [0.5]], dtype=torch.float64))
        assert close(got.item(), expected), stop


def test_gradient_reaches_the_gate_only():
    losses, gate, mask = make(3)
    losses.requires_grad_(True)
    gate.requires_grad_(True)
    k, gamma = 20.0, 0.02
    ex.stage2_gate_loss(losses, gate, k, gamma, mask).backward()
    assert losses.grad is None or (losses.grad == 0).all()
    L, lam = losses.detach(), gate.detach()

    S, B, T = gate.shape
    count = int(mask.sum())
    expected = torch.zeros(S, B, T, dtype=torch.float64)
    for t in range(1, S):
        for b in range(B):
            for i in range(T):
                if mask[b, i]:
                    improvement = max(0.0, float(L[t - 1, b, i]) - float(L[t, b, i]))
                    w = sigmoid(k * (improvement - gamma))
                    stop = float(lam[t - 1, b, i])
                    expected[t - 1, b, i] = (w / (1 - stop) - (1 - w) / stop) / (count * S)
    torch.testing.assert_close(gate.grad, expected, rtol=1e-9, atol=1e-12)


def test_mask_ignores_the_other_tokens():
    losses, gate, mask = make(4)
    base = ex.stage2_gate_loss(losses, gate, mask=mask)
    noisy_losses, noisy_gate = losses.clone(), gate.clone()
    noisy_losses[:, ~mask] = 1e3                      # garbage where the mask is False
    noisy_gate[:, ~mask] = 1.0
    assert close(ex.stage2_gate_loss(noisy_losses, noisy_gate, mask=mask).item(), base.item())
    # the same as keeping only the selected tokens, as a [S, N] tensor
    assert close(ex.stage2_gate_loss(losses[:, mask], gate[:, mask]).item(), base.item())
    # an all-True mask is the same as no mask
    everything = torch.ones_like(mask)
    assert close(ex.stage2_gate_loss(losses, gate, mask=everything).item(),
                 ex.stage2_gate_loss(losses, gate).item())


def test_rejects_bad_input():
    losses, gate, mask = make(5)
    bad_calls = [
        (losses, gate[:, :, :4], {}),                 # shapes differ
        (losses[:, :2], gate, {}),
        (losses[:1], gate[:1], {}),                   # one step: no improvement to measure
        (losses, gate * 2, {}),                       # gate outside [0, 1]
        (losses, gate, {"mask": mask[:, :4]}),        # mask of the wrong shape
        (losses, gate, {"mask": torch.zeros_like(mask)}),   # mask selects nothing
        (losses, gate, {"k": 0.0}),
    ]
    for step_losses, gates, options in bad_calls:
        with pytest.raises(ValueError):
            ex.stage2_gate_loss(step_losses, gates, **options)
