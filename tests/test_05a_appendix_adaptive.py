# Generated from book/05a_appendix_adaptive.py: edit the chapter, then run `make export`.

import contextlib
import copy
import dataclasses
import io
import math
import os
import tempfile

import pytest
import torch

from looplm.adaptive import (  # noqa: F401
    AdaptiveLoss,
    Objective,
    OBJECTIVES,
    GateLoss,
    gate_only,
    check_exit_probs,
    StabilityCheck,
    StabilityReport,
    stability_report,
)
from looplm.adaptive import (exit_distribution, exit_entropy, expected_depth, gate_on_detached_states,
                             q_exit_steps, stage1_loss, stage2_gate_loss, stage2_targets)
from looplm.data import IGNORE_INDEX
from looplm.exits import (  # noqa: F401
    StepView,
    ExitRule,
    QExit,
    ConfidenceExit,
    KLExit,
    HiddenChangeExit,
    FixedDepth,
    EXIT_RULES,
    make_exit_rule,
    step_view,
    exit_steps,
    select_exit_logits,
    mean_steps,
    QEXIT_THRESHOLDS,
    pick_exit_threshold,
    confidence_exit_steps,
    kl_exit_steps,
    hidden_change_exit_steps,
)
from looplm.experiments import (  # noqa: F401
    CH05_SPLITS,
    CH05_BUDGETS,
    ch05_rules,
    rule_curves,
    best_at_budgets,
    EXIT_RECIPE,
)
from looplm.model import EXIT_GATES, LinearExitGate, LoopLM, LoopLMConfig, LoopOutput
from looplm.train import (  # noqa: F401
    train_stage1,
    train_stage2,
    stage2_config,
    train_two_stage,
)
from looplm.train import TrainConfig, Trainer, default_loss

# --- book/05a_appendix_adaptive.py:684 (cell 28) ---
def _recipe_batches(generator):
    idx = torch.randint(0, 20, (4, 8), generator=generator)
    return idx, idx.roll(-1, dims=1)


def test_two_stage_recipe_freezes_the_model_in_stage_two():
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2, n_loops=3, exit_gate=True, max_seq_len=8))
    by_hand = copy.deepcopy(model)
    config = TrainConfig(steps=6, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=0, progress=False)
    recipe = train_two_stage(model, _recipe_batches, config, stage2_steps=2, beta=0.1)
    assert [r["stage"] for r in recipe.history] == [1, 1, 1, 1, 2, 2]
    assert [r["step"] for r in recipe.history] == [1, 2, 3, 4, 5, 6]
    hand = Trainer(by_hand, _recipe_batches, dataclasses.replace(config, steps=4), loss_fn=default_loss)
    hand.run(until=2)                                          # half of Stage I on the last step alone
    hand.loss_fn = AdaptiveLoss("stage1", beta=0.1, last_weight=0.5)
    hand.run()
    assert [r["loss"] for r in hand.history] == [r["loss"] for r in recipe.history[:4]]
    ours, theirs = model.state_dict(), by_hand.state_dict()
    for name in ours:
        if name.startswith("exit_gate."):
            assert not torch.equal(ours[name], theirs[name]), name       # Stage II trained the gate
        else:
            torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="exit_gate=True"):
        train_two_stage(LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2)), _recipe_batches, config, 2)
    with pytest.raises(ValueError, match="leaves no Stage I update"):
        train_two_stage(model, _recipe_batches, config, stage2_steps=6)
    with pytest.raises(ValueError, match="warm_steps=9 is more than the 4 Stage I updates"):
        train_two_stage(model, _recipe_batches, config, stage2_steps=2, warm_steps=9)
    with pytest.raises(ValueError, match=r"last_weight must be a finite number in \[0, 1\]"):
        train_two_stage(model, _recipe_batches, config, stage2_steps=2, last_weight=1.5)


def test_warm_steps_train_exactly_the_last_step_loss():
    # with last_weight = 1 the Stage I loss is the last step's mean loss: the same updates as a
    # model without a gate (whose other weights start equal), and the gate never moves
    torch.manual_seed(0)
    gated = LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2, n_loops=3, exit_gate=True, max_seq_len=8))
    torch.manual_seed(0)
    plain = LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2, n_loops=3, max_seq_len=8))
    gate_before = copy.deepcopy(gated.exit_gate.state_dict())
    config = TrainConfig(steps=3, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.0,
                         eval_every=0, progress=False)
    a = train_stage1(gated, _recipe_batches, config, warm_steps=3)
    b = Trainer(plain, _recipe_batches, config)
    b.run()
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert all(torch.equal(v, gated.exit_gate.state_dict()[k]) for k, v in gate_before.items())


def test_two_stage_command_line():
    # in this process (main() is the command line), which is much faster than a subprocess
    from looplm.train import main

    with tempfile.TemporaryDirectory() as folder:
        base = ["--recipe", "two-stage", "--task", "stack", "--difficulty", "2", "--n-train", "100", "--n-test", "20",
                "--steps", "6", "--stage2-steps", "2", "--batch-size", "4", "--d-model", "16", "--n-heads", "2",
                "--n-loops", "2", "--no-progress"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(base + ["--out", folder]) == 0
        assert "stage 2 done at step 6" in out.getvalue()
        assert sorted(os.listdir(folder)) == ["checkpoint.pt", "loss.png", "metrics.jsonl"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as refused:
            main(base + ["--grad-steps", "1", "--out", folder + "/other"])
        assert refused.value.code == 2 and "--grad-steps belongs to the 'standard' recipe" in err.getvalue()
        assert not os.path.exists(folder + "/other")

# --- book/05a_appendix_adaptive.py:867 (cell 34) ---
def test_stability_checks():
    good = exit_distribution(torch.rand(4, 2, 3))
    assert check_exit_probs(good) < 1e-6
    with pytest.raises(ValueError, match="must sum to 1 over the steps"):
        check_exit_probs(good * 0.9)
    with pytest.raises(ValueError, match=r"exit_probs holds NaN or inf, first at index \[1, 0, 2\] \(step 2\)"):
        bad = good.clone()
        bad[1, 0, 2] = float("nan")
        check_exit_probs(bad)
    with pytest.raises(ValueError, match="negative"):
        check_exit_probs(torch.tensor([[1.5], [-0.5]]))
    hidden = torch.randn(4, 2, 3, 8)
    settling = torch.stack([torch.ones(1, 2, 4) * (2 - 0.5 ** t) for t in range(5)])   # changes shrink
    out = LoopOutput(logits=torch.zeros(5, 1, 2, 3), hidden=settling)
    report = stability_report(out)
    assert report.ok and all(c.passed for c in report.checks)
    exploding = LoopOutput(logits=torch.zeros(3, 1, 2, 3), hidden=torch.stack([torch.ones(1, 2, 4) * 10 ** (3 * t) for t in range(3)]))
    report = stability_report(exploding, max_rms=1e3)
    assert not report.ok and [c.name for c in report.checks if not c.passed] == ["hidden RMS bounded", "step changes shrink"]
    with pytest.raises(ValueError, match="stability checks failed: hidden RMS bounded"):
        stability_report(exploding, raise_on_failure=True)
    nan_logits = LoopOutput(logits=torch.full((2, 1, 1, 3), float("nan")))
    assert not stability_report(nan_logits).ok

# --- book/05a_appendix_adaptive.py:1084 (cell 39) ---
def _slow_exit_distribution(gates):
    probs, survive = [], 1.0
    for t, gate in enumerate(gates):
        probs.append(gate * survive if t < len(gates) - 1 else survive)
        survive *= 1.0 - gate
    return probs


def test_exit_distribution_matches_loop_and_sums_to_one():
    torch.manual_seed(0)
    for shape in ((1, 5), (2, 3), (4, 2, 6), (7, 1, 1, 3)):
        gates = torch.rand(shape, dtype=torch.float64)
        probs = exit_distribution(gates)
        assert probs.shape == gates.shape
        flat_g, flat_p = gates.reshape(shape[0], -1), probs.reshape(shape[0], -1)
        for i in range(flat_g.shape[1]):
            expected = torch.tensor(_slow_exit_distribution(flat_g[:, i].tolist()), dtype=torch.float64)
            torch.testing.assert_close(flat_p[:, i], expected, rtol=0, atol=1e-15)
        torch.testing.assert_close(probs.sum(0), torch.ones(shape[1:], dtype=torch.float64))
    by_hand = exit_distribution(torch.tensor([0.5, 0.5, 0.5, 0.9]))
    assert by_hand.tolist() == [0.5, 0.25, 0.125, 0.125]        # the last gate is not used
    assert exit_distribution(torch.tensor([0.3])).tolist() == [1.0]
    assert math.isclose(expected_depth(by_hand).item(), 1.875, abs_tol=1e-6)
    assert math.isclose(exit_entropy(torch.full((4,), 0.25)).item(), math.log(4), abs_tol=1e-6)
    assert exit_entropy(torch.tensor([0.0, 1.0, 0.0])).item() == 0.0


def test_linear_gate_is_registered_and_fills_the_output():
    assert EXIT_GATES["linear"] is LinearExitGate
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, n_loops=3, exit_gate=True))
    assert sum(p.numel() for p in model.exit_gate.parameters()) == 32 + 1
    out = model(torch.randint(0, 20, (2, 5)))
    assert out.gate.shape == out.exit_probs.shape == (3, 2, 5)
    assert out.gate.dtype == torch.float32 and ((out.gate > 0) & (out.gate < 1)).all()
    assert torch.equal(out.exit_probs, exit_distribution(out.gate))
    torch.testing.assert_close(out.exit_probs.sum(0), torch.ones(2, 5))
    # a float64 model's gate is computed in float64, against the formula
    model = model.double()
    idx = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        out = model(idx)
        z = model.readout(model.step(model.embed(idx), model.embed(idx), *model.rope(5)), *model.rope(5))[1]
    assert out.gate.dtype == out.exit_probs.dtype == torch.float64
    w, b = model.exit_gate.proj.weight[0], model.exit_gate.proj.bias[0]
    torch.testing.assert_close(out.gate[0], 1 / (1 + torch.exp(-(z @ w + b))), rtol=0, atol=1e-15)

# --- book/05a_appendix_adaptive.py:1149 (cell 41) ---
def _slow_stage1(losses, probs, beta, mask):
    values = []
    for b in range(losses.shape[1]):
        for i in range(losses.shape[2]):
            if mask[b, i]:
                p = probs[:, b, i].tolist()
                expected = sum(q * l for q, l in zip(p, losses[:, b, i].tolist()))
                values.append(expected + beta * sum(q * math.log(q) for q in p if q > 0))
    return sum(values) / len(values)


def _slow_stage2(losses, gates, k, gamma, mask):
    total = 0.0
    for t in range(1, losses.shape[0]):
        terms = []
        for b in range(losses.shape[1]):
            for i in range(losses.shape[2]):
                if mask[b, i]:
                    improvement = max(0.0, losses[t - 1, b, i].item() - losses[t, b, i].item())
                    w = 1 / (1 + math.exp(-k * (improvement - gamma)))
                    lam = gates[t - 1, b, i].item()
                    terms.append(-(w * math.log(1 - lam) + (1 - w) * math.log(lam)))
        total += sum(terms) / len(terms)
    return total / losses.shape[0]


def test_stage1_loss_matches_loop_and_entropy_sign():
    torch.manual_seed(1)
    losses = torch.rand(4, 3, 5, dtype=torch.float64) * 3
    probs = exit_distribution(torch.rand(4, 3, 5, dtype=torch.float64))
    mask = torch.rand(3, 5) > 0.3
    for beta in (0.0, 0.05, 0.1, 1.0):
        got = stage1_loss(losses, probs, beta, mask).item()
        assert math.isclose(got, _slow_stage1(losses, probs, beta, mask), abs_tol=1e-12)
    everything = stage1_loss(losses, probs, 0.1)
    assert math.isclose(everything.item(), _slow_stage1(losses, probs, 0.1, torch.ones(3, 5, dtype=torch.bool)), abs_tol=1e-12)
    # the bonus lowers the loss of a spread distribution by exactly beta * H
    uniform = torch.full((4, 1), 0.25)
    step_losses = torch.tensor([[2.0], [1.0], [0.5], [0.25]])
    assert math.isclose(stage1_loss(step_losses, uniform, 0.0).item(), 0.9375, abs_tol=1e-6)
    drop = stage1_loss(step_losses, uniform, 0.0) - stage1_loss(step_losses, uniform, 0.1)
    assert math.isclose(drop.item(), 0.1 * math.log(4), abs_tol=1e-6)
    # and its gradient pushes a peaked distribution toward spreading out
    logits = torch.tensor([[3.0], [0.0], [0.0], [0.0]], requires_grad=True)
    stage1_loss(torch.zeros(4, 1), logits.softmax(0), 1.0).backward()
    assert logits.grad[0, 0] > 0 and (logits.grad[1:] < 0).all()


def test_stage2_gate_loss_matches_loop_and_detaches():
    torch.manual_seed(2)
    losses = (torch.rand(5, 2, 4, dtype=torch.float64) * 0.2).requires_grad_()
    gates = (torch.rand(5, 2, 4, dtype=torch.float64) * 0.98 + 0.01).requires_grad_()
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    for k, gamma in ((50.0, 0.005), (5.0, 0.1)):
        got = stage2_gate_loss(losses, gates, k, gamma, mask)
        assert math.isclose(got.item(), _slow_stage2(losses, gates, k, gamma, mask), abs_tol=1e-9)
    stage2_gate_loss(losses, gates).backward()
    assert losses.grad is None and gates.grad is not None
    assert (gates.grad[-1] == 0).all()                          # the last gate gets no label
    # by hand: one token, L = (1.0, 0.5), λ_1 = 0.2: I = 0.5, w = σ(50 (0.5 − 0.005))
    w = 1 / (1 + math.exp(-50 * 0.495))
    expected = -(w * math.log(0.8) + (1 - w) * math.log(0.2)) / 2
    got = stage2_gate_loss(torch.tensor([[1.0], [0.5]]), torch.tensor([[0.2], [0.7]]))
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    assert math.isclose(stage2_targets(torch.tensor([[0.3], [0.3]])).item(), 1 / (1 + math.exp(0.25)), rel_tol=1e-6)
    # saturated gates (exactly 0 and 1, as a float32 sigmoid gives past a logit of about 17):
    # a finite loss and a finite gradient
    logits = torch.tensor([[20.0, -120.0], [0.0, 0.0]], requires_grad=True)
    loss = stage2_gate_loss(torch.tensor([[1.0, 1.0], [0.5, 0.5]]), torch.sigmoid(logits))
    loss.backward()
    assert torch.sigmoid(logits)[0].tolist() == [1.0, 0.0]
    assert math.isfinite(loss.item()) and torch.isfinite(logits.grad).all()


def test_stage2_forward_runs_the_model_without_gradients():
    # called directly, with every parameter trainable (no gate_only): only the gate gets a graph,
    # and a backward pass leaves every other parameter's gradient empty
    torch.manual_seed(3)
    model = LoopLM(LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, n_loops=3, exit_gate=True))
    idx = torch.randint(0, 20, (2, 6))
    out = gate_on_detached_states(model, idx, targets=idx)
    assert not out.logits.requires_grad and not out.step_losses.requires_grad
    assert out.gate.requires_grad and out.exit_probs.requires_grad
    with torch.no_grad():
        reference = model(idx, targets=idx)
    assert torch.equal(out.gate.detach(), reference.gate) and torch.equal(out.step_losses, reference.step_losses)
    GateLoss()(model, idx, idx)[0].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("exit_gate."), name

# --- book/05a_appendix_adaptive.py:1248 (cell 43) ---
def _slow_q_exit(gates, q, min_steps):
    cdf = 0.0
    for t, p in enumerate(_slow_exit_distribution(gates), start=1):
        cdf += p
        if cdf >= q and t >= min_steps:
            return t
    return len(gates)


def test_q_exit_steps_edge_cases():
    halves = torch.full((4, 1), 0.5)                            # CDF 0.5, 0.75, 0.875, 1
    assert [q_exit_steps(halves, q).item() for q in (0.5, 0.6, 0.75, 0.8, 0.9, 1.0)] == [1, 2, 2, 3, 4, 4]
    assert q_exit_steps(halves, 0.1, min_steps=3).item() == 3     # the floor is respected
    assert q_exit_steps(halves, 1.0, min_steps=2).item() == 4
    assert q_exit_steps(torch.full((4, 1), 0.01), 0.5).item() == 4   # never reached: S
    assert q_exit_steps(torch.tensor([[0.2], [1.0], [0.3]]), 1.0).item() == 2   # q = 1 needs CDF = 1
    assert q_exit_steps(torch.tensor([[0.7]]), 1.0).item() == 1      # one step: always step 1
    steps = q_exit_steps(torch.rand(3, 2, 5), 0.5)
    assert steps.dtype == torch.long and steps.shape == (2, 5) and steps.min() >= 1 and steps.max() <= 3
    torch.manual_seed(3)
    gates = torch.rand(6, 50, dtype=torch.float64)
    for q in (0.05, 0.5, 0.99, 1.0):
        for m in (1, 4, 6):
            got = q_exit_steps(gates, q, m)
            assert got.tolist() == [_slow_q_exit(gates[:, i].tolist(), q, m) for i in range(50)]
            assert torch.equal(exit_steps(QExit(q, m), gate=gates), got)


def test_other_rules_match_loops():
    torch.manual_seed(4)
    logits, hidden = torch.randn(5, 2, 3, 7) * 2, torch.randn(5, 2, 3, 8)
    probs = logits.softmax(-1)
    for b in range(2):
        for i in range(3):
            def first(condition, start=1):
                return next((t for t in range(start, 6) if condition(t)), 5)
            conf = first(lambda t: probs[t - 1, b, i].max() >= 0.6)
            kl = first(lambda t: (probs[t - 1, b, i] * (probs[t - 1, b, i] / probs[t - 2, b, i]).log()).sum() <= 0.5, 2)
            change = first(lambda t: (hidden[t - 1, b, i] - hidden[t - 2, b, i]).norm()
                           / hidden[t - 2, b, i].norm() <= 1.2, 2)
            assert confidence_exit_steps(logits, 0.6)[b, i] == conf
            assert kl_exit_steps(logits, 0.5)[b, i] == kl
            assert hidden_change_exit_steps(hidden, 1.2)[b, i] == change
    assert (exit_steps(FixedDepth(3), logits=logits) == 3).all()
    assert (exit_steps(ConfidenceExit(0.01, min_steps=4), logits=logits) == 4).all()
    assert (kl_exit_steps(logits, 1e9) == 2).all()              # a KL rule never stops at step 1
    assert (kl_exit_steps(logits[:1], 1e9) == 1).all()          # ... unless there is one step only
    assert make_exit_rule("kl", 0.1).threshold == 0.1 and set(EXIT_RULES) == {
        "q_exit", "confidence", "kl", "hidden_change", "fixed"}


def test_per_sequence_steps_and_select_exit_logits():
    gates = torch.tensor([[0.9, 0.1, 0.9], [0.1, 0.9, 0.1], [0.5, 0.5, 0.5]])[:, None, :]   # (S=3, B=1, T=3)
    token_steps = q_exit_steps(gates, 0.5)
    assert token_steps.tolist() == [[1, 2, 1]]
    mask = torch.tensor([[True, True, False]])
    assert exit_steps(QExit(0.5), gate=gates, per="sequence", mask=mask).tolist() == [[2, 2, 2]]
    everything = exit_steps(QExit(0.5), gate=gates, per="sequence")
    assert everything.tolist() == [[2, 2, 2]]
    # mean CDF over the masked tokens: step 1 (0.9 + 0.1) / 2 = 0.5 >= 0.5
    assert exit_steps(QExit(0.5), gate=gates, per="sequence", reduce="mean", mask=mask).tolist() == [[1, 1, 1]]
    assert exit_steps(QExit(0.6), gate=gates, per="sequence", reduce="mean", mask=mask).tolist() == [[2, 2, 2]]
    logits = torch.arange(3 * 2 * 2 * 4, dtype=torch.float32).view(3, 2, 2, 4)
    steps = torch.tensor([[1, 3], [2, 2]])
    picked = select_exit_logits(logits, steps)
    assert picked.shape == (2, 2, 4)
    for b in range(2):
        for i in range(2):
            assert torch.equal(picked[b, i], logits[steps[b, i] - 1, b, i])
    assert torch.equal(select_exit_logits(logits, torch.full((2, 2), 3)), logits[-1])
    assert mean_steps(steps) == 2.0 and mean_steps(steps, torch.tensor([[True, True], [False, False]])) == 2.0

# --- book/05a_appendix_adaptive.py:1331 (cell 45) ---
def test_bad_input_gets_clear_errors():
    torch.manual_seed(0)
    plain = LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2, n_loops=3))
    gated = LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2, n_loops=3, exit_gate=True))
    idx = torch.randint(0, 20, (2, 5))
    out = gated(idx, targets=idx)
    for q in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"q must be a number in \(0, 1\]"):
            q_exit_steps(out.gate, q)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        stage1_loss(out.step_losses, out.exit_probs, beta=-0.1)
    with pytest.raises(ValueError, match="must have the same shape"):
        stage1_loss(out.step_losses[:2], out.exit_probs, beta=0.1)
    with pytest.raises(ValueError, match="must have the same shape"):
        stage2_gate_loss(out.step_losses, out.gate[:, :1])
    with pytest.raises(ValueError, match="built without one"):
        q_exit_steps(plain(idx).gate, 0.5)
    with pytest.raises(ValueError, match="built without one"):
        exit_steps(QExit(0.5), plain(idx))
    with pytest.raises(ValueError, match="built without one"):
        AdaptiveLoss("stage1")(plain, idx, idx)
    with pytest.raises(ValueError, match="built without an exit gate"):
        with gate_only(plain):
            pass
    with pytest.raises(ValueError, match="unknown exit rule 'median'"):
        make_exit_rule("median", 0.5)
