from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 9.1 (the Switch loss). The references are numbers worked out by hand
# and looplm.moe.switch_aux_loss on the routing of a real MoE layer.

import pytest  # noqa: E402
import torch  # noqa: E402

from looplm.moe import MoEFeedForward, switch_aux_loss  # noqa: E402


def test_hand_computed_values():
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25]], dtype=torch.float64)
    assert abs(ex.switch_loss(torch.tensor([[0], [0]]), probs, 2).item() - 1.25) < 1e-12       # f = (1, 0)
    probs3 = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.2, 0.4]], dtype=torch.float64)
    got = ex.switch_loss(torch.tensor([[0, 1], [0, 2]]), probs3, 3).item()
    assert abs(got - 3 * (0.5 * 0.45 + 0.25 * 0.25 + 0.25 * 0.3)) < 1e-12
    uniform = torch.full((6, 3), 1 / 3, dtype=torch.float64)
    assert abs(ex.switch_loss(torch.tensor([[0], [1], [2], [0], [1], [2]]), uniform, 3).item() - 1.0) < 1e-12


def test_matches_the_package_on_a_real_routing_and_carries_the_gradient():
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 8, 2, 12)
    layer(torch.randn(40, 16))
    record = layer.last_routing
    ours = ex.switch_loss(record.chosen, record.probs, 8)
    torch.testing.assert_close(ours, switch_aux_loss([record], 8))
    ours.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        ex.switch_loss(torch.zeros(3, 1, dtype=torch.long), torch.full((4, 2), 0.5), 2)
    with pytest.raises(ValueError):
        ex.switch_loss(torch.zeros(4, 1, dtype=torch.long), torch.full((4, 2), 0.5), 3)
