# Generated from book/06_other_ways_to_stop.py: edit the chapter, then run `make export`.

import math

import pytest
import torch
import torch.nn.functional as F

from looplm.adaptive import OBJECTIVES, AdaptiveLoss, exit_distribution
from looplm.data import IGNORE_INDEX, TASK_VOCAB
from looplm.experiments import (  # noqa: F401
    CH06_OBJECTIVES,
    OTHER_OBJECTIVES,
)
from looplm.model import LoopLM, LoopLMConfig
from looplm.objectives import (  # noqa: F401
    act_halting,
    act_loss,
    geometric_prior,
    pondernet_loss,
    gumbel_exit_weights,
    gumbel_exit_loss,
)
from looplm.refine import (  # noqa: F401
    encode_answer_slots,
    RecursiveConfig,
    RecursiveOutput,
    RecursiveReasoner,
    deep_supervision_step,
    recursive_predict,
)
from looplm.results import check_prefix

# --- book/06_other_ways_to_stop.py:439 (cell 31) ---
def test_stored_objectives_match_a_live_prefix():
    difference, _ = check_prefix("other-objectives")
    assert difference <= 1e-3

# --- book/06_other_ways_to_stop.py:779 (cell 54) ---
def test_act_pondernet_and_gumbel_match_their_definitions():
    gate = torch.tensor([0.3, 0.5, 0.4, 0.9], dtype=torch.float64).view(4, 1)
    weights, n_halt, remainder = act_halting(gate, eps=0.01)
    torch.testing.assert_close(weights.flatten(), torch.tensor([0.3, 0.5, 0.2, 0.0], dtype=torch.float64))
    assert n_halt.item() == 3 and abs(remainder.item() - 0.2) < 1e-12
    losses = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64).view(4, 1)
    expected = 0.3 * 4 + 0.5 * 3 + 0.2 * 2 + 0.01 * (3 + 0.2)
    assert abs(act_loss(losses, gate, tau=0.01).item() - expected) < 1e-12
    gates = torch.rand(5, 3, 7, dtype=torch.float64)                  # ACT weights always sum to 1
    torch.testing.assert_close(act_halting(gates)[0].sum(0), torch.ones(3, 7, dtype=torch.float64))

    prior = geometric_prior(4, 0.5)
    torch.testing.assert_close(prior, torch.tensor([0.5, 0.25, 0.125, 0.125]))
    probs = exit_distribution(torch.rand(4, 6, dtype=torch.float64))
    step_losses = torch.rand(4, 6, dtype=torch.float64)
    kl = sum(probs[t] * (probs[t].log() - math.log(prior[t].item())) for t in range(4))
    expected = ((probs * step_losses).sum(0) + 0.1 * kl).mean()
    torch.testing.assert_close(pondernet_loss(step_losses, probs, lambda_p=0.5, beta=0.1), expected)

    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(4, 1).expand(4, 20000)
    sample = gumbel_exit_weights(probs, hard=True, generator=generator)
    assert set(sample.unique().tolist()) == {0.0, 1.0} and (sample.sum(0) == 1).all()
    torch.testing.assert_close(sample.mean(1), torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.015, rtol=0)
    logits = torch.zeros(4, 1, requires_grad=True)                    # straight-through: a gradient flows
    gumbel_exit_loss(torch.arange(4.0).view(4, 1), logits.softmax(0), generator=generator).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def _tiny_reasoner(**changes):
    torch.manual_seed(0)
    options = dict(vocab_size=TASK_VOCAB.vocab_size, d_model=16, n_heads=2, n_layers=1, n_latent=2,
                   n_cycles=2, max_supervision=3, max_seq_len=12)
    return RecursiveReasoner(RecursiveConfig(**{**options, **changes}))


def test_recursive_reasoner_deep_supervision_and_halting():
    model = _tiny_reasoner()
    idx = torch.randint(0, TASK_VOCAB.vocab_size, (4, 10))
    targets = torch.full((4, 10), IGNORE_INDEX)
    targets[:, -2:] = torch.randint(0, TASK_VOCAB.vocab_size, (4, 2))
    out = model(idx)
    assert out.logits.shape == (4, 10, TASK_VOCAB.vocab_size) and out.halt_logit.shape == (4,)
    assert all(not t.requires_grad for t in out.carry)                # the carry is detached

    # one supervision step = one recursion with gradient after n_cycles - 1 without: same values
    cos, sin = model.rope(10)
    x = model.embed(idx)
    y, z = model.y_init.expand_as(x), model.z_init.expand_as(x)
    for _ in range(model.config.n_cycles):
        for _ in range(model.config.n_latent):
            z = model.f(z + y + x, cos, sin)
        y = model.f(y + z, cos, sin)
    torch.testing.assert_close(out.logits, model.lm_head(model.norm(y)), rtol=0, atol=1e-6)

    # deep supervision: one optimizer step per supervision step, halting label = correctness
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    calls = []
    optimizer.step = lambda *a, **k: calls.append(1)
    records = deep_supervision_step(model, optimizer, idx, targets)
    assert len(records) == len(calls) == model.config.max_supervision
    with torch.no_grad():
        first = model(idx)
        correct = ((first.logits.argmax(-1) == targets) | (targets == IGNORE_INDEX)).all(-1).float()
        expected = F.binary_cross_entropy_with_logits(first.halt_logit, correct).item()
    assert abs(records[0]["halt_loss"] - expected) < 1e-6
    assert abs(records[0]["accuracy"] - correct.mean().item()) < 1e-6

    # inference: halt at the first step whose halting probability reaches the threshold
    with torch.no_grad():
        model.halt_head.bias.fill_(-20.0)                                # never confident
        logits, steps = recursive_predict(model, idx)
        assert steps.tolist() == [3, 3, 3, 3]
        model.halt_head.weight.zero_()
        model.halt_head.bias.fill_(20.0)                                 # always confident
        logits, steps = recursive_predict(model, idx)
        assert steps.tolist() == [1, 1, 1, 1]
        torch.testing.assert_close(logits, model(idx).logits)


def test_the_objectives_are_registered_and_train():
    assert {"stage1", "act", "pondernet", "gumbel"} <= set(OBJECTIVES)
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2, n_loops=3, exit_gate=True, max_seq_len=8))
    idx = torch.randint(0, 20, (4, 8))
    for name in ("act", "pondernet", "gumbel"):
        loss, metrics = AdaptiveLoss(name)(model, idx, idx)
        loss.backward()
        assert math.isfinite(loss.item()) and abs(sum(metrics[f"mass_{t}"] for t in (1, 2, 3)) - 1) < 1e-5
        assert model.exit_gate.proj.weight.grad is not None
        model.zero_grad(set_to_none=True)
    # Gumbel's generator is seeded by its option and saved with the loss
    a, b = AdaptiveLoss("gumbel", seed=3), AdaptiveLoss("gumbel", seed=3)
    assert torch.equal(a(model, idx, idx)[0], b(model, idx, idx)[0])
    with pytest.raises(ValueError, match="objective 'act' takes options"):
        AdaptiveLoss("act", beta=0.1)
