# Generated from book/03_fixed_loops.py: edit the chapter, then run `make export`.
from looplm.model import (  # noqa: F401
    AddInjection,
    ConcatInjection,
    ZerosInit,
    RandomInit,
)
from looplm.diagnostics import (  # noqa: F401
    hidden_norms,
    step_changes,
)
from looplm.train import (  # noqa: F401
    TrainConfig,
    lr_at,
    default_loss,
    Trainer,
    train,
    task_batches,
    task_accuracy,
    evaluate_tasks,
)
from looplm.experiments import (  # noqa: F401
    CH03_SPLITS,
    CH03_MODELS,
    LOOPED_VS_STACKED,
)

# --- book/03_fixed_loops.py, cell 30 ---
import math

import pytest
import torch

from looplm.block import RMSNorm
from looplm.model import INIT_STATES, INJECTIONS, LoopLM, LoopLMConfig, looplm_param_count


def _random_gains(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))


def _loop_by_hand(model, idx, n_loops, inject):
    """Logits [S, B, T, V] of a 1-block-core LoopLM with h_0 = x0, `inject` given as a formula."""
    cos, sin = model.rope(idx.shape[1])
    x0 = model.embed(idx)
    h, logits = x0, []
    for _ in range(n_loops):
        h = model.core[0](inject(h, x0), cos, sin)
        logits.append(model.lm_head(model.norm(h)))
    return torch.stack(logits)


def test_injections_match_their_formulas():
    d, eps = 32, 1e-6
    formulas = {
        "none": lambda m: (lambda h, x0: h),
        "add": lambda m: (lambda h, x0: h + x0 * torch.rsqrt(x0.pow(2).mean(-1, keepdim=True) + eps)
                          * m.injection.norm.weight),
        "concat": lambda m: (lambda h, x0: h @ m.injection.adapter.weight[:, :d].T
                             + x0 @ m.injection.adapter.weight[:, d:].T),
    }
    for seed, (name, formula) in enumerate(formulas.items()):
        torch.manual_seed(seed)
        model = LoopLM(LoopLMConfig(vocab_size=30, d_model=d, n_heads=4, n_loops=3, injection=name,
                                    norm_style="sandwich", eps=eps))
        _random_gains(model, seed)
        idx = torch.randint(0, 30, (2, 7))
        with torch.no_grad():
            expected = _loop_by_hand(model, idx, 3, formula(model))
            torch.testing.assert_close(model(idx).logits, expected, rtol=0, atol=1e-5)


def test_injection_parameters_and_init():
    cfg = LoopLMConfig(vocab_size=30, d_model=32, n_heads=4, injection="concat")
    torch.manual_seed(0)
    adapter = INJECTIONS["concat"](cfg).adapter
    assert adapter.weight.shape == (32, 64) and adapter.bias is None
    assert abs(adapter.weight.std().item() - math.sqrt(2 / (5 * 32))) < 0.01
    add = INJECTIONS["add"](LoopLMConfig(vocab_size=30, d_model=32, n_heads=4, injection="add"))
    assert [p.shape for p in add.parameters()] == [(32,)] and bool((add.norm.weight == 1).all())
    for name, extra in (("none", 0), ("add", 32), ("concat", 2 * 32 * 32)):
        cfg = LoopLMConfig(vocab_size=30, d_model=32, n_heads=4, injection=name)
        base = looplm_param_count(LoopLMConfig(vocab_size=30, d_model=32, n_heads=4))
        assert looplm_param_count(cfg) == base + extra == sum(p.numel() for p in LoopLM(cfg).parameters())

# --- book/03_fixed_loops.py, cell 47 ---
def _normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_zero_and_embedding_states():
    torch.manual_seed(0)
    x0 = torch.randn(2, 5, 32)
    for name, expected in (("embedding", x0), ("zeros", torch.zeros(2, 5, 32))):
        cfg = LoopLMConfig(vocab_size=30, d_model=32, n_heads=4, injection="add", init_state=name)
        assert torch.equal(INIT_STATES[name](cfg)(x0), expected)
    assert INIT_STATES["zeros"](cfg)(x0.bfloat16()).dtype == torch.bfloat16


def test_random_state_is_truncated_normal_with_variance_two_fifths():
    cfg = LoopLMConfig(vocab_size=30, d_model=32, n_heads=4, injection="concat", init_state="random")
    init = INIT_STATES["random"](cfg)
    init.generator = torch.Generator().manual_seed(0)
    draws = init(torch.zeros(4, 1000, 32)).flatten().double()       # 128,000 values
    sigma = math.sqrt(2 / 5)
    assert draws.abs().max() <= 3 * sigma + 1e-6
    Z = _normal_cdf(3) - _normal_cdf(-3)
    std = sigma * math.sqrt(1 - 6 * math.exp(-4.5) / math.sqrt(2 * math.pi) / Z)
    assert abs(draws.std().item() - std) < 0.005 and abs(draws.mean().item()) < 0.005
    for x in (-1.0, -0.3, 0.2, 0.9):
        expected = (_normal_cdf(x / sigma) - _normal_cdf(-3)) / Z
        assert abs((draws <= x).double().mean().item() - expected) < 0.006, x


def test_random_state_is_reproducible():
    cfg = LoopLMConfig(vocab_size=30, d_model=32, n_heads=4, injection="add", init_state="random")
    init, x0 = INIT_STATES["random"](cfg), torch.zeros(2, 3, 32)
    torch.manual_seed(7)
    first, second = init(x0), init(x0)
    torch.manual_seed(7)
    assert torch.equal(init(x0), first) and not torch.equal(first, second)
    draws = []
    for _ in range(2):
        init.generator = torch.Generator().manual_seed(3)
        draws.append(init(x0))
    assert torch.equal(*draws)
    assert init(x0.bfloat16()).dtype == torch.bfloat16
    torch.manual_seed(0)
    model = LoopLM(cfg)
    idx = torch.randint(0, 30, (2, 6))
    torch.manual_seed(1)
    a = model(idx).logits
    torch.manual_seed(1)
    assert torch.equal(a, model(idx).logits)


def test_forward_generator_drives_the_random_state():
    cfg = LoopLMConfig(vocab_size=30, d_model=32, n_heads=4, injection="add", init_state="random")
    torch.manual_seed(0)
    model = LoopLM(cfg)
    idx = torch.randint(0, 30, (2, 6))
    global_state = torch.get_rng_state()
    a = model(idx, generator=torch.Generator().manual_seed(4)).logits
    b = model(idx, generator=torch.Generator().manual_seed(4)).logits
    c = model(idx, generator=torch.Generator().manual_seed(5)).logits
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), global_state)     # the global generator was not used
    # a float64 model draws its start in float64
    assert INIT_STATES["random"](cfg)(torch.zeros(1, 2, 32, dtype=torch.float64),
                                      generator=torch.Generator()).dtype == torch.float64


def test_state_without_input_is_refused():
    for name in ("zeros", "random"):
        with pytest.raises(ValueError, match=f"init_state='{name}' starts the loop without the input"):
            LoopLM(LoopLMConfig(vocab_size=30, d_model=32, n_heads=4, init_state=name))
    assert set(INIT_STATES) >= {"embedding", "zeros", "random"}
    assert set(INJECTIONS) >= {"none", "add", "concat"}

# --- book/03_fixed_loops.py, cell 53 ---
def test_diagnostics_match_an_explicit_loop():
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=30, d_model=32, n_heads=4, n_loops=4, injection="concat",
                                init_state="zeros", norm_style="huginn"))
    idx = torch.randint(0, 30, (3, 6))
    with torch.no_grad():
        hidden = model(idx, return_hidden=True).hidden            # (S, B, T, D)
        cos, sin = model.rope(6)
        x0 = model.encode(idx, cos, sin)
        h, norms, changes = model.init_state(x0), [], []
        for t in range(4):
            previous, h = h, model.step(h, x0, cos, sin)
            norms.append(torch.sqrt((h * h).sum(-1) / 32))
            if t > 0:
                changes.append(torch.sqrt(((h - previous) ** 2).sum(-1) / (previous**2).sum(-1)))
    torch.testing.assert_close(hidden_norms(hidden), torch.stack(norms), rtol=1e-5, atol=0)
    torch.testing.assert_close(step_changes(hidden), torch.stack(changes), rtol=1e-5, atol=0)
    assert step_changes(hidden.bfloat16()).dtype == torch.float32


def test_diagnostics_errors():
    with pytest.raises(ValueError, match=r"hidden must be a floating-point tensor \[S, B, T, D\]"):
        hidden_norms(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="hidden must be a floating-point tensor"):
        hidden_norms(torch.zeros(2, 3, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden has S=1 steps; at least 2 needed"):
        step_changes(torch.zeros(1, 3, 4, 5))

# --- book/03_fixed_loops.py, cell 79 ---
import dataclasses


def test_lr_schedule_at_key_steps():
    c = TrainConfig(steps=200, lr=1e-2, min_lr=1e-3, warmup_steps=20)
    assert lr_at(0, c) == 0.0
    assert math.isclose(lr_at(10, c), 5e-3) and math.isclose(lr_at(20, c), 1e-2)
    assert math.isclose(lr_at(110, c), 1e-3 + 0.5 * 9e-3)            # half way down the cosine
    assert math.isclose(lr_at(200, c), 1e-3) and lr_at(250, c) == 1e-3
    for s in range(21, 200):
        expected = 1e-3 + 0.5 * 9e-3 * (1 + math.cos(math.pi * (s - 20) / 180))
        assert math.isclose(lr_at(s, c), expected, rel_tol=1e-12)
        assert lr_at(s, c) <= lr_at(s - 1, c)
    no_warmup = TrainConfig(steps=10, warmup_steps=0)
    assert lr_at(0, no_warmup) == no_warmup.lr
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        lr_at(-1, c)

# --- book/03_fixed_loops.py, cell 81 ---
def _copy_batches(batch_size=8, seq_len=10, vocab_size=23):
    def get_batch(generator):
        idx = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
        return idx, idx.clone()
    return get_batch


def _tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    return LoopLM(LoopLMConfig(**{"vocab_size": 23, "d_model": 32, "n_heads": 4, "n_loops": 2, **changes}))


def _tiny_config(**changes):
    return TrainConfig(**{"steps": 20, "batch_size": 8, "warmup_steps": 5, "eval_every": 5,
                          "progress": False, **changes})


def test_training_lowers_the_loss():
    trainer = train(_tiny_model(), _copy_batches(), _tiny_config(steps=40, lr=1e-2))
    losses = [row["loss"] for row in trainer.history]
    assert trainer.step == len(trainer.history) == 40
    assert losses[0] > 2.5 and sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert [row["step"] for row in trainer.history] == list(range(1, 41))
    assert all(math.isfinite(row["grad_norm"]) and row["lr"] == lr_at(row["step"], trainer.config)
               for row in trainer.history)


def test_resume_is_exact():
    changes = dict(injection="add", init_state="random")
    evaluate = lambda model: {"probe": model(torch.arange(10)[None], n_loops=3).logits.sum().item()}

    def fresh(seed):
        return Trainer(_tiny_model(seed, **changes), _copy_batches(), _tiny_config(), evaluate=evaluate)

    straight = fresh(0)
    straight.run()
    first = fresh(0)
    first.run(until=10)
    state = first.state_dict()
    first.run()                                 # keeps training: the snapshot must not change
    resumed = fresh(seed=1)                     # other initial weights, overwritten by the state
    resumed.load_state_dict(state)
    assert resumed.step == 10
    resumed.run()
    assert resumed.history == straight.history == first.history
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert [row["step"] for row in straight.history if "eval_probe" in row] == [5, 10, 15, 20]


def test_non_finite_loss_or_gradient_stops_without_an_update():
    def nan_after_3(model, idx, targets):
        loss = model(idx, targets=targets).loss
        return (loss * float("nan") if trainer.step >= 3 else loss), {"three": 3.0}

    trainer = Trainer(_tiny_model(), _copy_batches(), _tiny_config(), loss_fn=nan_after_3)
    trainer.run(until=3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    adam_steps = [s["step"].item() for s in trainer.optimizer.state_dict()["state"].values()]
    with pytest.raises(FloatingPointError, match="step 4: the loss is nan; no update was applied"):
        trainer.run()
    assert trainer.step == len(trainer.history) == 3 and trainer.history[-1]["three"] == 3.0
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    assert [s["step"].item() for s in trainer.optimizer.state_dict()["state"].values()] == adam_steps

    model = _tiny_model()
    model.embed.weight.register_hook(lambda grad: grad * float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, _copy_batches(), _tiny_config())
    with pytest.raises(FloatingPointError, match="step 1: the gradient norm is (inf|nan)"):
        trainer.run()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())

# --- book/03_fixed_loops.py, cell 83 ---
from looplm.data import TASK_VOCAB, answer_accuracy, encode_examples, make_splits


def test_weight_decay_groups():
    model = _tiny_model(injection="concat", tie_embeddings=False)
    decay, no_decay = (group["params"] for group in Trainer(model, _copy_batches(), _tiny_config())
                       .optimizer.param_groups)
    ids = lambda params: {id(p) for p in params}
    assert ids(decay) == {id(p) for n, p in model.named_parameters() if p.ndim == 2 and n != "embed.weight"}
    assert id(model.embed.weight) in ids(no_decay) and id(model.lm_head.weight) in ids(decay)
    assert all(p.ndim == 1 for p in no_decay if p is not model.embed.weight)
    assert len(ids(decay) | ids(no_decay)) == len(list(model.parameters()))


def test_task_helpers():
    splits = make_splits("sorting", n_train=50, n_test=20, max_difficulty=3, ood_max_difficulty=4, seed=0)
    get_batch = task_batches(splits, batch_size=6)
    idx, targets = get_batch(torch.Generator().manual_seed(0))
    again, _ = get_batch(torch.Generator().manual_seed(0))
    longest = max(len(ex.prompt) + len(ex.answer) for ex in splits.train)    # positions needed
    assert idx.shape == targets.shape == (6, longest) and torch.equal(idx, again)
    rows = [TASK_VOCAB.decode(r) for r in idx]
    assert all(any(r.startswith(ex.prompt + ex.answer) for ex in splits.train) for r in rows)
    model = _tiny_model(n_loops=3)
    accuracy = task_accuracy(model, splits.test, n_loops=5, batch_size=7)
    batch = encode_examples(splits.test)
    with torch.no_grad():
        expected = answer_accuracy(model(batch.idx, n_loops=5).logits, batch.targets).float().mean(-1)
    assert accuracy.shape == (5,) and torch.equal(accuracy, expected)
    results = evaluate_tasks(splits)(model)
    assert list(results) == ["test_acc", "ood_acc"] and results["test_acc"] == task_accuracy(model, splits.test)[-1].item()
    with pytest.raises(ValueError, match="split 'ood' has no examples"):
        evaluate_tasks({"test": splits.test, "ood": []})


def test_train_config_errors():
    cases = [(dict(steps=0), "steps must be an int >= 1, got 0"),
             (dict(batch_size=2.0), "batch_size must be an int >= 1, got 2.0"),
             (dict(lr=0.0), "lr must be a finite number > 0, got 0.0"),
             (dict(min_lr=0.01), r"min_lr must be a finite number in \[0, 0.003\], got 0.01"),
             (dict(warmup_steps=500), r"warmup_steps must be an int in \[0, steps=500\), got 500"),
             (dict(weight_decay=-0.1), r"weight_decay must be a finite number in \[0, inf\]"),
             (dict(betas=[0.9, 0.95]), "betas must be a tuple of two numbers"),
             (dict(betas=(0.9, 1.0)), r"betas\[1\] must be a finite number in \[0, 1\), got 1.0"),
             (dict(grad_clip=0), "grad_clip must be a number > 0"),
             (dict(eval_every=-1), "eval_every must be an int >= 0"),
             (dict(seed=None), "seed must be an int >= 0, got None"),
             (dict(device="gpu"), "device must be a device string"),
             (dict(autocast=1), "autocast must be True or False"),
             (dict(progress="no"), "progress must be True or False")]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**change)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            TrainConfig(device="cuda")
    assert TrainConfig(grad_clip=math.inf).grad_clip == math.inf


def test_bad_batches_and_metrics():
    model, config = _tiny_model(), _tiny_config()
    good = _copy_batches()
    cases = [(lambda g: good(g)[0], TypeError, "get_batch must return a pair"),
             (lambda g: (good(g)[0].float(), good(g)[1]), TypeError, "idx of dtype torch.float32"),
             (lambda g: (good(g)[0], good(g)[1][:, :4]), ValueError, r"same shape \[B, T\], got \[8, 10\] and \[8, 4\]"),
             (lambda g: (good(g)[0][:5], good(g)[1][:5]), ValueError, "5 rows but config.batch_size=8")]
    for get_batch, error, message in cases:
        with pytest.raises(error, match=message):
            Trainer(model, get_batch, config).run(until=1)
    bad_metric = lambda m, i, t: (m(i, targets=t).loss, {"loss": 1.0})
    with pytest.raises(ValueError, match="metric name 'loss' is not allowed"):
        Trainer(model, good, config, loss_fn=bad_metric).run(until=1)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        Trainer(model, good, dataclasses.asdict(config))
    trainer = Trainer(model, good, config)
    trainer.run(until=2)
    with pytest.raises(ValueError, match="until must be an int >= 2, got 1"):
        trainer.run(until=1)
    with pytest.raises(ValueError, match=r"state is missing \['generator'"):
        trainer.load_state_dict({k: v for k, v in trainer.state_dict().items() if k != "generator"})

# --- book/03_fixed_loops.py, cell 108 ---
from looplm.results import check_prefix


def test_stored_results_match_a_live_prefix():
    difference, _ = check_prefix("looped-vs-stacked")
    assert difference <= 1e-3
