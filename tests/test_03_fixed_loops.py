# Generated from book/03_fixed_loops.py: edit the chapter, then run `make export`.

import math

import pytest
import torch

from looplm.block import RMSNorm
from looplm.diagnostics import (  # noqa: F401
    hidden_norms,
    step_changes,
)
from looplm.experiments import (  # noqa: F401
    CH03_SPLITS,
    CH03_MODELS,
    LOOPED_VS_STACKED,
)
from looplm.model import (  # noqa: F401
    AddInjection,
    ConcatInjection,
    ZerosInit,
    RandomInit,
)
from looplm.model import INIT_STATES, INJECTIONS, LoopLM, LoopLMConfig, looplm_param_count
from looplm.results import check_prefix

# --- book/03_fixed_loops.py:311 (cell 30) ---
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

# --- book/03_fixed_loops.py:539 (cell 47) ---
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

# --- book/03_fixed_loops.py:694 (cell 53) ---
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

# --- book/03_fixed_loops.py:1041 (cell 80) ---
def test_stored_results_match_a_live_prefix():
    difference, _ = check_prefix("looped-vs-stacked")
    assert difference <= 1e-3
