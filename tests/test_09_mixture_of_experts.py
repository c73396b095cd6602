# Generated from book/09_mixture_of_experts.py: edit the chapter, then run `make export`.

import math
import tempfile
from pathlib import Path

import pytest
import torch

from looplm.bench import (  # noqa: F401
    bench_moe,
    format_moe_table,
    plot_moe,
)
from looplm.block import SwiGLU
from looplm.checkpoints import load_model, save_model
from looplm.exits import FixedDepth, QExit, exit_steps
from looplm.experiments import (  # noqa: F401
    CH09_MODELS,
    active_parameters,
    MOE_LOOP_EXPERIMENT,
)
from looplm.generate import generate
from looplm.model import (  # noqa: F401
    MOE_DEFAULTS,
)
from looplm.model import LoopLM, LoopLMConfig, looplm_param_count
from looplm.moe import (  # noqa: F401
    RoutingRecord,
    route,
    expert_forward,
    experts_loop,
    experts_grouped,
    MoEFeedForward,
    keep_within_capacity,
    switch_aux_loss,
    entropy_balance_loss,
    router_z_loss,
    expert_load,
    LoopMoE,
    routing_by_step,
    routing_summary,
)
from looplm.testing import recompute_greedy
from looplm.train import TrainConfig, Trainer

# --- book/09_mixture_of_experts.py:263 (cell 14) ---
def _pair(dtype, router, n_shared=0, capacity_factor=None, seed=0):
    """A loop and a grouped layer with the same weights, the router skewed so that capacity drops."""
    torch.manual_seed(seed)
    a = MoEFeedForward(8, 4, 2, 6, router=router, n_shared=n_shared, capacity_factor=capacity_factor, impl="loop")
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.4)
        a.router.weight[0] += 1.0
    a = a.to(dtype)
    b = MoEFeedForward(8, 4, 2, 6, router=router, n_shared=n_shared, capacity_factor=capacity_factor,
                       impl="grouped").to(dtype)
    b.load_state_dict(a.state_dict())
    return a, b


def test_loop_and_grouped_agree_forward_and_backward():
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        for router in ("softmax", "sigmoid"):
            for n_shared, capacity in ((0, None), (1, None), (0, 1.0)):
                a, b = _pair(dtype, router, n_shared, capacity)
                x = (torch.randn(2, 7, 8, dtype=torch.float64) + 0.3).to(dtype)
                xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
                ya, yb = a(xa), b(xb)
                if capacity is not None:
                    assert not a.last_routing.kept.all()               # some assignments were dropped
                scale = max(1.0, ya.abs().max().item())
                assert (ya - yb).abs().max().item() / scale <= tol
                (ya * torch.arange(8, dtype=dtype)).sum().backward()
                (yb * torch.arange(8, dtype=dtype)).sum().backward()
                for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
                    scale = max(1.0, pa.grad.abs().max().item())
                    assert (pa.grad - pb.grad).abs().max().item() / scale <= tol, (dtype, router, name)
                assert (xa.grad - xb.grad).abs().max().item() / max(1.0, xa.grad.abs().max().item()) <= tol


def test_one_expert_top1_is_the_dense_mlp():
    torch.manual_seed(0)
    dense = SwiGLU(16, 24).double()
    for impl in ("loop", "grouped"):
        moe = MoEFeedForward(16, 1, 1, 24, impl=impl).double()
        with torch.no_grad():
            moe.w_gate.copy_(dense.gate.weight.T[None])
            moe.w_up.copy_(dense.up.weight.T[None])
            moe.w_down.copy_(dense.down.weight.T[None])
        x = torch.randn(3, 5, 16, dtype=torch.float64)
        torch.testing.assert_close(moe(x), dense(x), atol=1e-14, rtol=0)


def test_gradients_reach_the_router_and_the_experts():
    for router in ("softmax", "sigmoid"):
        torch.manual_seed(1)
        moe = MoEFeedForward(8, 4, 2, 6, router=router, n_shared=1)
        moe(torch.randn(4, 6, 8)).pow(2).sum().backward()
        for name, p in moe.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (router, name)

# --- book/09_mixture_of_experts.py:365 (cell 18) ---
def _slow_kept(chosen, n_experts, capacity):
    used, kept = [0] * n_experts, torch.zeros_like(chosen, dtype=torch.bool)
    for j in range(chosen.shape[1]):
        for n in range(chosen.shape[0]):
            e = int(chosen[n, j])
            if used[e] < capacity:
                used[e], kept[n, j] = used[e] + 1, True
    return kept


def test_capacity_drops_exactly_the_predicted_assignments():
    for seed in range(3):
        for factor in (0.5, 1.0, 1.5):
            _, moe = _pair(torch.float64, "softmax", capacity_factor=factor, seed=seed)
            x = torch.randn(3, 9, 8, dtype=torch.float64) + 0.3
            y = moe(x)
            rec = moe.last_routing
            capacity = math.ceil(factor * 27 * 2 / 4)
            assert torch.equal(rec.kept, _slow_kept(rec.chosen, 4, capacity)), (seed, factor)
            dropped = ~rec.kept.any(1)                                     # every choice of the token dropped
            assert torch.equal(y.reshape(-1, 8)[dropped], torch.zeros_like(y.reshape(-1, 8)[dropped]))
    chosen = torch.tensor([[0, 1], [0, 1], [0, 2]])
    assert keep_within_capacity(chosen, 3, 2).tolist() == [[True, True], [True, True], [False, True]]

# --- book/09_mixture_of_experts.py:485 (cell 24) ---
_L3 = math.log(3.0)


def _record(probs, logits, chosen, kept=None):
    chosen = torch.tensor(chosen)
    return RoutingRecord(torch.tensor(probs, dtype=torch.float64), torch.tensor(logits, dtype=torch.float64), chosen,
                         torch.ones(chosen.shape, dtype=torch.float64),
                         torch.ones(chosen.shape, dtype=torch.bool) if kept is None else torch.tensor(kept))


REC_A = _record([[0.5, 0.5], [0.75, 0.25]], [[0.0, 0.0], [_L3, 0.0]], [[0], [0]])
REC_B = _record([[0.25, 0.75], [0.25, 0.75]], [[0.0, _L3], [0.0, _L3]], [[1], [1]])
REC_C = _record([[0.5, 0.3, 0.2], [0.4, 0.2, 0.4]], [[0.0] * 3] * 2, [[0, 1], [0, 2]], [[True, True], [False, True]])


def test_balancing_losses_by_hand():
    close = lambda got, want: abs(float(got) - want) < 1e-12                       # noqa: E731
    assert close(switch_aux_loss([REC_A], 2), 2 * 0.625)                           # f = (1, 0), P = (.625, .375)
    assert close(switch_aux_loss([REC_A, REC_B], 2, per_step=True), (1.25 + 1.5) / 2)
    assert close(switch_aux_loss([REC_A, REC_B], 2), 2 * (0.5 * 0.4375 + 0.5 * 0.5625))   # pooled: 1
    assert close(switch_aux_loss([REC_C], 3), 3 * (0.5 * 0.45 + 0.25 * 0.25 + 0.25 * 0.3))   # dropped counts
    assert close(entropy_balance_loss([REC_A, REC_B]), 0.4375 * math.log(0.4375) + 0.5625 * math.log(0.5625))
    assert close(entropy_balance_loss([REC_A, REC_B], per_step=True),
                 (0.625 * math.log(0.625) + 0.375 * math.log(0.375) + 0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / 2)
    assert close(router_z_loss([REC_A, REC_B]), (1 + 4 + 4 + 4) / 4 * math.log(2) ** 2)   # lse = ln 2, ln 4
    assert expert_load([REC_C], 3).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])        # kept only
    assert expert_load([REC_A, REC_B], 2).tolist() == [0.5, 0.5]

# --- book/09_mixture_of_experts.py:645 (cell 29) ---
def _moe_model(seed=0, **options):
    torch.manual_seed(seed)
    options = {"n_experts": 4, "top_k": 2, "n_loops": 3, **options}
    return LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, max_seq_len=40, mlp="moe", **options))


def test_outputs_and_parameter_count():
    for options in (dict(), dict(n_prelude=1, n_coda=1, n_shared_experts=1), dict(balance="bias"),
                    dict(balance="entropy", balance_pool="step", z_loss=0.1, router="sigmoid")):
        model = _moe_model(**options)
        out = model(torch.randint(0, 23, (2, 9)))
        assert sum(p.numel() for p in model.parameters()) == looplm_param_count(model.config)
        assert out.expert_load.shape == (3, 4)
        torch.testing.assert_close(out.expert_load.sum(1), torch.ones(3))
        assert out.aux_loss.ndim == 0 and out.aux_loss.requires_grad == (options.get("balance") != "bias")
        if options.get("balance") == "bias":
            assert out.aux_loss.item() == 0.0
    assert LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4))(torch.zeros(1, 3, dtype=torch.long)).aux_loss is None


def test_aux_loss_is_the_switch_loss_of_every_call_and_checkpointing_counts_once():
    model = _moe_model(n_core=2)
    idx = torch.randint(0, 23, (2, 9))
    records = {}
    for block in model.core:                                    # every call, gathered by hand
        block.mlp.register_forward_hook(lambda m, i, o: records.setdefault(id(m), []).append(m.last_routing))
    out = model(idx)
    expected = sum(switch_aux_loss(rs, 4) for rs in records.values()) / 2
    torch.testing.assert_close(out.aux_loss, expected)
    model.train()
    for block in model.core:
        block.mlp.pending.zero_()
    plain = model(idx)
    counts = [block.mlp.pending.clone() for block in model.core]
    assert all(c.sum() == 3 * 18 * 2 for c in counts)           # S x tokens x k, once
    for block in model.core:
        block.mlp.pending.zero_()
    ck = model(idx, checkpoint=True)
    ck.logits.sum().backward()                                   # the backward recomputes each step
    assert [block.mlp.pending for block in model.core][0].sum() == 3 * 18 * 2
    torch.testing.assert_close(ck.aux_loss, plain.aux_loss)
    torch.testing.assert_close(ck.expert_load, plain.expert_load)


def test_bias_balancing_moves_load_toward_uniform_once_per_optimizer_step():
    model = _moe_model(balance="bias", bias_rate=0.05)
    model.train()
    idx = torch.randint(0, 23, (8, 12))
    for _ in range(3):                                           # gradient accumulation: 3 forwards ...
        model(idx)
    layer = model.core[0].mlp
    pending = layer.pending.clone()
    assert pending.sum() == 3 * 3 * 96 * 2                       # forwards x steps x tokens x k
    model.balance_step()                                         # ... one update
    torch.testing.assert_close(layer.bias, 0.05 * torch.sign(pending.mean() - pending))
    skewed = _moe_model(balance="bias", bias_rate=0.01, router="sigmoid", top_k=1)    # DeepSeek-V3's setting
    layer = skewed.core[0].mlp
    with torch.no_grad():                                        # a router that prefers expert 0
        layer.router.weight.normal_(0, 0.3)
        layer.router.weight[0] += 0.3
    x = torch.randn(256, 32) + 0.5
    spread = lambda: (expert_load([layer.last_routing], 4) - 0.25).abs().max().item()   # noqa: E731
    layer(x)
    before = spread()
    for _ in range(40):
        LoopMoE.statistics(skewed.config, [[(layer, layer.last_routing)]], count=True)
        layer.balance_step()
        layer(x)
    assert before > 0.5 and spread() < before / 4, (before, spread())


def test_the_trainer_adds_the_aux_loss_and_balances():
    model = _moe_model(balance="bias")
    batches = lambda g: (torch.randint(0, 23, (4, 10), generator=g), torch.randint(0, 23, (4, 10), generator=g))  # noqa: E731
    trainer = Trainer(model, batches, TrainConfig(steps=3, batch_size=4, warmup_steps=0, eval_every=0, progress=False))
    trainer.run()
    assert all("aux_loss" in row for row in trainer.history)
    assert model.core[0].mlp.bias.abs().sum() > 0 and model.core[0].mlp.pending.sum() == 0
    switch = _moe_model()
    trainer = Trainer(switch, batches, TrainConfig(steps=2, batch_size=4, warmup_steps=0, eval_every=0, progress=False,
                                                   aux_weight=0.5))
    trainer.run()
    assert all(row["aux_loss"] > 0 for row in trainer.history)


def test_a_moe_checkpoint_saves_and_loads():
    model = _moe_model(balance="bias", capacity_factor=1.5)
    with torch.no_grad():
        model.core[0].mlp.bias.fill_(0.3)
    path = save_model(Path(tempfile.mkdtemp()) / "moe.pt", model)
    loaded = load_model(path)
    assert loaded.config == model.config and torch.equal(loaded.core[0].mlp.bias, model.core[0].mlp.bias)
    idx = torch.randint(0, 23, (2, 8))
    assert torch.equal(loaded(idx).logits, model(idx).logits)


def test_bad_moe_configs_name_the_field():
    base = dict(vocab_size=23, d_model=32, n_heads=4)
    for options, field in ((dict(mlp="moe", n_experts=2, top_k=3), "top_k"), (dict(mlp="moe", n_experts=0), "n_experts"),
                           (dict(mlp="moe", capacity_factor=0.0), "capacity_factor"),
                           (dict(mlp="moe", router="relu"), "router"), (dict(mlp="moe", balance="loss"), "balance"),
                           (dict(n_experts=8), "n_experts"), (dict(top_k=2), "top_k"), (dict(balance="bias"), "balance"),
                           (dict(mlp="sparse"), "mlp")):
        with pytest.raises(ValueError, match=field):
            LoopLMConfig(**base, **options)

# --- book/09_mixture_of_experts.py:780 (cell 31) ---
def test_cached_decoding_with_experts_equals_recomputing():
    for options in (dict(), dict(n_prelude=1, n_coda=1, router="sigmoid", n_shared_experts=1)):
        model = _moe_model(seed=2, **options)
        res = generate(model, [[1, 5, 7, 3, 9]], 7)
        tokens, logits = recompute_greedy(model, [1, 5, 7, 3, 9], 7)
        assert torch.equal(res.new_tokens[0], tokens)
        torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)


def test_early_exit_with_experts_and_the_load_of_active_tokens():
    model = _moe_model(seed=3, n_loops=4)
    res = generate(model, [[1, 5, 7, 3], [2, 4, 6, 8]], 6, exit_rule=FixedDepth(2))
    tokens, logits = recompute_greedy(model, [1, 5, 7, 3], 6, n_loops=2)      # every token exits at 2
    assert torch.equal(res.new_tokens[0], tokens)
    torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)
    load = res.expert_load
    torch.testing.assert_close(load[:2].sum(1), torch.ones(2, dtype=load.dtype))
    assert load[2:].abs().sum() == 0                                           # nobody ran steps 3, 4
    gated = _moe_model(seed=4, n_loops=4, exit_gate=True)
    res = generate(gated, [[1, 5, 7, 3]], 6, exit_rule=QExit(0.5), exit_mode="select")
    torch.testing.assert_close(res.expert_load.sum(1), torch.ones(4, dtype=res.expert_load.dtype))

# --- book/09_mixture_of_experts.py:1147 (cell 47) ---
def test_per_token_exits_with_experts_equal_a_reference_without_a_cache():
    """Section 9.6: tokens exit at different steps (Q-exit on the gate, the readout chosen per token
    while every step runs); the reference recomputes the full forward for every new token."""
    model = _moe_model(seed=6, n_loops=4, exit_gate=True, n_prelude=1)
    with torch.no_grad():
        model.exit_gate.proj.weight.normal_(0, 0.5)            # gates that differ from token to token
    prompt, q = [1, 5, 7, 3, 9], 0.9
    res = generate(model, [prompt], 6, exit_rule=QExit(q), exit_mode="select")
    seq, used = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(6):
            out = model(seq)
            step = exit_steps(QExit(q), gate=out.gate)[0, -1]
            used.append(int(step))
            seq = torch.cat([seq, out.logits[step - 1, 0, -1].argmax().view(1, 1)], 1)
    assert res.steps[0].tolist() == used and len(set(used)) > 1
    assert torch.equal(res.new_tokens[0], seq[0, len(prompt):])
