from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 9.3 (one bias update per optimizer step). The references are a case
# worked out by hand, where per-forward or per-step updates would give other biases, and the
# package's own balancing: LoopLM forwards followed by balance_step.

import torch  # noqa: E402

from looplm.model import LoopLM, LoopLMConfig  # noqa: E402


def test_hand_computed_case_where_the_order_matters():
    # two forwards per update, two steps each, two experts
    counts = torch.tensor([[[3.0, 1.0], [0.0, 4.0]],      # forward 1: step 1 favours expert 0, step 2 expert 1
                           [[2.0, 2.0], [4.0, 0.0]]], dtype=torch.float64)     # forward 2
    # totals over the update: expert 0: 9, expert 1: 7 -> b = gamma * sign(8 - (9, 7)) = (-0.1, +0.1)
    assert ex.accumulated_bias(counts, 0.1, 2).tolist() == [-0.1, 0.1]
    # one update per forward: forward 1 totals (3, 5) -> (+0.1, -0.1); forward 2 (6, 2) -> (0, 0)
    assert ex.accumulated_bias(counts, 0.1, 1).tolist() == [0.0, 0.0]


def test_matches_the_models_balance_step():
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_loops=3, mlp="moe", n_experts=4, top_k=2,
                                balance="bias", bias_rate=0.01))
    model.train()
    layer, seen = model.core[0].mlp, []
    layer.register_forward_hook(lambda m, i, o: seen.append(
        torch.bincount(m.last_routing.chosen.reshape(-1), minlength=4).double()))
    for update in range(3):
        for _ in range(2):                                         # two micro-batches per update
            model(torch.randint(0, 23, (4, 9)))
        model.balance_step()
    counts = torch.stack(seen).view(6, 3, 4)                       # forwards x steps x experts
    torch.testing.assert_close(ex.accumulated_bias(counts, 0.01, 2), layer.bias.double())
