from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 9.2 (effective experts per step). The references are the two ends
# of the scale (uniform, one expert), a hand-computed row, and the loads of a real looped MoE.

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from looplm.generate import generate  # noqa: E402
from looplm.exits import FixedDepth  # noqa: E402
from looplm.model import LoopLM, LoopLMConfig  # noqa: E402


def test_ends_of_the_scale_and_a_hand_computed_row():
    load = torch.tensor([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.5, 0.25, 0.25, 0]], dtype=torch.float64)
    got = ex.effective_experts(load)
    assert got.shape == (4,)
    expected = [4.0, 1.0, 2.0, math.exp(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_a_looped_models_loads_and_a_step_no_token_ran():
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_loops=4, mlp="moe", n_experts=6, top_k=2))
    out = model(torch.randint(0, 23, (3, 10)))
    got = ex.effective_experts(out.expert_load.double())
    assert ((got >= 1) & (got <= 6)).all()
    res = generate(model, [[1, 2, 3]], 5, exit_rule=FixedDepth(2))
    got = ex.effective_experts(res.expert_load)
    assert got[2:].tolist() == [0.0, 0.0] and (got[:2] >= 1).all()


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        ex.effective_experts(torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError):
        ex.effective_experts(torch.tensor([[1.5, -0.5]]))
