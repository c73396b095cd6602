# Generated from book/02_one_step_is_a_gpt.py: edit the chapter, then run `make export`.
from looplm.model import (  # noqa: F401
    MAX_VOCAB_SIZE,
    GPTConfig,
    GPT,
    NoInjection,
    EmbeddingInit,
    INJECTIONS,
    INIT_STATES,
    EXIT_GATES,
    LoopLMConfig,
    LoopOutput,
    token_losses,
    LoopLM,
    gpt_param_count,
    looplm_param_count,
)

# --- book/02_one_step_is_a_gpt.py, cell 100 ---
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from looplm.block import NORM_STYLES
from looplm.data import IGNORE_INDEX


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_from_gpt_matches_gpt():
    cases = [dict(norm_style="pre"), dict(norm_style="sandwich", tie_embeddings=False),
             dict(norm_style="huginn", d_hidden=40), dict(norm_style="sandwich", n_layers=1)]
    for seed, case in enumerate(cases):
        torch.manual_seed(seed)
        gpt = GPT(GPTConfig(**{"vocab_size": 50, "d_model": 32, "n_heads": 2, "n_layers": 3, **case}))
        model = LoopLM.from_gpt(gpt)
        assert model.config.n_core == gpt.config.n_layers and model.config.n_loops == 1
        assert model.config.n_prelude == model.config.n_coda == 0
        idx = torch.randint(0, 50, (3, 9))
        with torch.no_grad():
            out = model(idx)
            assert out.logits.shape == (1, 3, 9, 50)
            assert _max_diff(out.logits[0], gpt(idx)) <= 1e-6, case


def test_from_gpt_copies_instead_of_sharing():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=30, d_model=32, n_heads=4, n_layers=2, tie_embeddings=False))
    model = LoopLM.from_gpt(gpt, n_loops=3)
    assert model.config.n_loops == 3
    gpt_ptrs = {p.data_ptr() for p in gpt.parameters()}
    assert not gpt_ptrs & {p.data_ptr() for p in model.parameters()}
    with pytest.raises(TypeError, match="gpt must be a GPT"):
        LoopLM.from_gpt(model)

# --- book/02_one_step_is_a_gpt.py, cell 102 ---
def _gpt_config_like(cfg, n_layers):
    """The GPTConfig with cfg's shared fields and n_layers blocks."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig)
              if f.name != "n_layers"}
    return GPTConfig(n_layers=n_layers, **shared)


def test_looped_model_with_one_step_is_a_gpt():
    for style in NORM_STYLES:
        torch.manual_seed(0)
        model = LoopLM(LoopLMConfig(vocab_size=40, d_model=32, n_heads=2, n_core=3, n_loops=1,
                                    norm_style=style))
        gpt = GPT(_gpt_config_like(model.config, 3))
        state = {k.replace("core.", "blocks.", 1): v for k, v in model.state_dict().items()}
        gpt.load_state_dict(state)
        idx = torch.randint(0, 40, (2, 11))
        with torch.no_grad():
            assert _max_diff(model(idx).logits[0], gpt(idx)) <= 1e-6, style


def test_each_step_is_an_unrolled_gpt():
    torch.manual_seed(1)
    model = LoopLM(LoopLMConfig(vocab_size=40, d_model=32, n_heads=2, n_loops=4,
                                norm_style="sandwich", tie_embeddings=False))
    idx = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        steps = model(idx).logits                             # (4, B, T, V)
        for t in range(1, 5):
            gpt = GPT(_gpt_config_like(model.config, t))
            state = {k: v for k, v in model.state_dict().items() if not k.startswith("core.")}
            for i in range(t):                                # every layer holds the core's weights
                state.update({f"blocks.{i}.{k}": v for k, v in model.core[0].state_dict().items()})
            gpt.load_state_dict(state)
            assert _max_diff(steps[t - 1], gpt(idx)) <= 1e-6, t

# --- book/02_one_step_is_a_gpt.py, cell 104 ---
def _small_loop_config(**changes):
    base = dict(vocab_size=37, d_model=32, n_heads=4, n_prelude=1, n_core=2, n_coda=1, n_loops=3)
    return LoopLMConfig(**{**base, **changes})


def test_output_shapes_and_n_loops_override():
    torch.manual_seed(0)
    model = LoopLM(_small_loop_config())
    idx = torch.randint(0, 37, (2, 5))
    out = model(idx)
    assert out.logits.shape == (3, 2, 5, 37)
    assert out.gate is None and out.exit_probs is None and out.hidden is None
    assert out.step_losses is None and out.loss is None
    for n_loops in (1, 7):
        out = model(idx, n_loops=n_loops, return_hidden=True)
        assert out.logits.shape == (n_loops, 2, 5, 37)
        assert out.hidden.shape == (n_loops, 2, 5, 32)
    assert model.config.effective_depth() == 1 + 2 * 3 + 1
    assert model.config.effective_depth(5) == 1 + 2 * 5 + 1


def test_step_losses_match_cross_entropy():
    torch.manual_seed(0)
    model = LoopLM(_small_loop_config(tie_embeddings=False))
    idx = torch.randint(0, 37, (3, 8))
    targets = torch.randint(0, 37, (3, 8))
    targets[0, :5] = IGNORE_INDEX                              # e.g. a prompt
    targets[2, 6:] = IGNORE_INDEX                              # e.g. padding
    out = model(idx, targets=targets)
    assert out.step_losses.shape == (3, 3, 8)
    learned = targets != IGNORE_INDEX
    for t in range(3):
        by_hand = F.cross_entropy(out.logits[t].reshape(-1, 37), targets.reshape(-1),
                                  reduction="none").view(3, 8)
        torch.testing.assert_close(out.step_losses[t], by_hand * learned, rtol=0, atol=1e-6)
        assert (out.step_losses[t][~learned] == 0).all()
    mean_last = F.cross_entropy(out.logits[-1][learned], targets[learned])
    torch.testing.assert_close(out.loss, mean_last, rtol=0, atol=1e-6)


def test_whole_model_is_causal():
    for style in NORM_STYLES:
        torch.manual_seed(0)
        model = LoopLM(_small_loop_config(norm_style=style))
        idx = torch.randint(0, 37, (2, 12))
        changed = idx.clone()
        changed[:, 6] = (changed[:, 6] + 1) % 37               # change the token at position 6
        with torch.no_grad():
            a, b = model(idx).logits, model(changed).logits    # (S, B, T, V)
        assert _max_diff(a[:, :, :6], b[:, :, :6]) < 1e-6, style    # earlier positions: untouched
        assert _max_diff(a[:, :, 6:], b[:, :, 6:]) > 1e-4, style    # later ones: changed


def test_seed_gives_identical_outputs():
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = LoopLM(_small_loop_config())
        idx = torch.randint(0, 37, (2, 6))
        outputs.append(model(idx, targets=idx).step_losses)
    assert torch.equal(outputs[0], outputs[1])


def _reference_logits_float64(model, idx, n_loops):
    """Every step's logits of a LoopLM (injection "none", init "embedding"), from the formulas in
    float64 with plain tensor operations: no module of the package is called."""
    c, f64 = model.config, torch.float64
    W = {name: t.detach().to(f64) for name, t in model.state_dict().items()}
    T, hs = idx.shape[1], c.head_dim
    angles = torch.arange(T, dtype=f64)[:, None] * c.rope_base ** (-torch.arange(0, hs, 2, dtype=f64) / hs)
    cos, sin = angles.cos(), angles.sin()                      # (T, hs/2)

    def norm(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c.eps) * w

    def rotate(x):                                             # (B, nh, T, hs), rotate-half pairs
        a, b = x[..., : hs // 2], x[..., hs // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def attention(x, p):
        B = x.shape[0]
        q, k, v = (x @ W[p + "attn.qkv.weight"].T).split(c.d_model, dim=-1)
        q, k, v = (t.view(B, T, c.n_heads, hs).transpose(1, 2) for t in (q, k, v))
        scores = rotate(q) @ rotate(k).transpose(-2, -1) / math.sqrt(hs)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, c.d_model)
        return y @ W[p + "attn.proj.weight"].T

    def mlp(x, p):
        g, u = x @ W[p + "mlp.gate.weight"].T, x @ W[p + "mlp.up.weight"].T
        return (g * torch.sigmoid(g) * u) @ W[p + "mlp.down.weight"].T

    def block(x, p):
        n = [W[f"{p}norms.{i}.weight"] for i in range(2 if c.norm_style == "pre" else 4)]
        if c.norm_style == "pre":
            x = x + attention(norm(x, n[0]), p)
            return x + mlp(norm(x, n[1]), p)
        if c.norm_style == "sandwich":
            x = x + norm(attention(norm(x, n[0]), p), n[1])
            return x + norm(mlp(norm(x, n[2]), p), n[3])
        x = norm(x + attention(norm(x, n[0]), p), n[1])
        return norm(x + mlp(norm(x, n[2]), p), n[3])

    x = W["embed.weight"][idx]
    for i in range(c.n_prelude):
        x = block(x, f"prelude.{i}.")
    h, steps = x, []
    for _ in range(n_loops):
        for i in range(c.n_core):
            h = block(h, f"core.{i}.")
        out = h
        for i in range(c.n_coda):
            out = block(out, f"coda.{i}.")
        steps.append(norm(out, W["norm.weight"]) @ W["lm_head.weight"].T)
    return torch.stack(steps)


def test_float64_model_computes_in_float64():
    # a model converted with .double() must match a float64 reference to float64 precision:
    # a float32 step anywhere (norm, rope tables, losses) would leave errors near 1e-7
    for style in NORM_STYLES:
        torch.manual_seed(0)
        model = LoopLM(_small_loop_config(norm_style=style, tie_embeddings=style != "pre")).double()
        idx = torch.randint(0, 37, (2, 9))
        with torch.no_grad():
            out = model(idx, targets=idx, return_hidden=True)
        assert out.logits.dtype == out.hidden.dtype == out.step_losses.dtype == torch.float64
        expected = _reference_logits_float64(model, idx, 3)
        torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-12)
        by_hand = F.cross_entropy(expected.reshape(-1, 37), idx.repeat(3, 1).reshape(-1),
                                  reduction="none").view(3, 2, 9)
        torch.testing.assert_close(out.step_losses, by_hand, rtol=0, atol=1e-12)

# --- book/02_one_step_is_a_gpt.py, cell 120 ---
def test_weights_are_shared_across_steps():
    counts = set()
    for n_loops in (1, 2, 8):
        torch.manual_seed(0)
        model = LoopLM(_small_loop_config(n_loops=n_loops))
        counts.add(sum(p.numel() for p in model.parameters()))
    assert len(counts) == 1                                   # n_loops adds no parameter

    calls = []                                                # (block id, weight tensor id) per call
    for block in model.core:
        block.register_forward_hook(
            lambda m, args, out: calls.append((id(m), id(m.attn.qkv.weight))))
    model(torch.randint(0, 37, (1, 4)), n_loops=5)
    assert len(calls) == 5 * 2 and len(set(calls)) == 2        # 5 steps, the same 2 blocks

    model.zero_grad()
    model(torch.randint(0, 37, (1, 4)), targets=torch.randint(0, 37, (1, 4)), n_loops=3).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_param_count_formulas():
    for n_layers, style, tie, d_hidden in ((1, "pre", True, None), (3, "sandwich", False, 48),
                                           (2, "huginn", True, None)):
        cfg = GPTConfig(vocab_size=61, d_model=32, n_heads=4, n_layers=n_layers,
                        d_hidden=d_hidden, norm_style=style, tie_embeddings=tie)
        assert gpt_param_count(cfg) == sum(p.numel() for p in GPT(cfg).parameters()), cfg
    for shape, style, tie in (((0, 1, 0), "pre", True), ((1, 2, 1), "sandwich", False),
                              ((2, 3, 0), "huginn", True)):
        cfg = LoopLMConfig(61, 32, 4, *shape, n_loops=5, norm_style=style, tie_embeddings=tie)
        assert looplm_param_count(cfg) == sum(p.numel() for p in LoopLM(cfg).parameters()), cfg
    block = 4 * 32**2 + 3 * 32 * 88 + 2 * 32                   # d_hidden defaults to 88 at d=32
    assert gpt_param_count(GPTConfig(61, 32, 4, 3)) == 61 * 32 + 3 * block + 32
    assert looplm_param_count(LoopLMConfig(61, 32, 4, n_core=3, n_loops=9)) == 61 * 32 + 3 * block + 32

# --- book/02_one_step_is_a_gpt.py, cell 138 ---
import re


def test_config_validation_errors():
    base = dict(vocab_size=50, d_model=32, n_heads=4)
    cases = [
        (dict(vocab_size=0), "vocab_size must be an int in [1, 2147483647], got 0"),
        (dict(vocab_size=True), "vocab_size must be an int in [1, 2147483647], got True"),
        (dict(d_model=0), "d_model must be an int >= 1, got 0"),
        (dict(d_model=32.0), "d_model must be an int >= 1, got 32.0"),
        (dict(n_heads=0), "n_heads must be an int >= 1, got 0"),
        (dict(n_heads=3), "n_heads must divide d_model, got n_heads=3 and d_model=32"),
        (dict(n_heads=32), "head_dim = d_model // n_heads = 1 must be even"),
        (dict(d_hidden=0), "d_hidden must be an int >= 1, got 0"),
        (dict(max_seq_len=0), "max_seq_len must be an int >= 1, got 0"),
        (dict(norm_style="post"), "norm_style must be one of 'pre', 'sandwich', 'huginn'; got 'post'"),
        (dict(tie_embeddings=1), "tie_embeddings must be True or False, got 1"),
        (dict(rope_base=1.0), "rope_base must be a finite number > 1, got 1.0"),
        (dict(eps=0.0), "eps must be a finite number > 0, got 0.0"),
        (dict(init_std=float("nan")), "init_std must be a finite number > 0, got nan"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            GPTConfig(**{**base, "n_layers": 2, **change})
        with pytest.raises(ValueError, match=re.escape(message)):
            LoopLMConfig(**{**base, **change})
    with pytest.raises(ValueError, match="n_layers must be an int >= 1, got 0"):
        GPTConfig(**base, n_layers=0)
    loop_cases = [
        (dict(n_prelude=-1), "n_prelude must be an int >= 0, got -1"),
        (dict(n_core=0), "n_core must be an int >= 1, got 0"),
        (dict(n_coda=1.5), "n_coda must be an int >= 0, got 1.5"),
        (dict(n_loops=0), "n_loops must be an int >= 1, got 0"),
        (dict(injection="no-such-injection"), "injection must be one of 'none'"),
        (dict(init_state="no-such-state"), "init_state must be one of 'embedding'"),
        (dict(exit_gate="yes"), "exit_gate must be True or False, got 'yes'"),
        (dict(gate_head=None), "gate_head must be a str naming an entry of EXIT_GATES"),
    ]
    for change, message in loop_cases:
        with pytest.raises(ValueError, match=message):
            LoopLMConfig(**base, **change)
    with pytest.raises(ValueError, match="n_loops must be an int >= 1, got 0"):
        LoopLMConfig(**base).effective_depth(0)


def test_model_input_errors():
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, max_seq_len=8))
    ids = torch.randint(0, 20, (2, 6))
    with pytest.raises(TypeError, match="idx must be an integer tensor"):
        model(ids.float())
    with pytest.raises(TypeError, match="idx must be a torch.Tensor"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"idx must have shape \[B, T\]"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"idx holds ids outside \[0, vocab_size=20\): min 0, max 20"):
        model(torch.tensor([[0, 20]]))
    with pytest.raises(ValueError, match="idx holds ids outside"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="idx has T=9 positions but max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must have the shape of idx \[2, 6\]"):
        model(ids, targets=ids[:, :3])
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        model(ids, targets=ids.float())
    with pytest.raises(ValueError, match="targets has no position to learn"):
        model(ids, targets=torch.full_like(ids, IGNORE_INDEX))
    with pytest.raises(ValueError, match="targets holds ids outside"):
        model(ids, targets=torch.full_like(ids, 20))
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="n_loops must be an int >= 1"):
            model(ids, n_loops=bad)
    with pytest.raises(ValueError, match="return_hidden must be True or False"):
        model(ids, return_hidden=1)
    with pytest.raises(TypeError, match="config must be a LoopLMConfig"):
        LoopLM(GPTConfig(20, 32, 4, 2))
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        GPT(LoopLMConfig(20, 32, 4))
    with pytest.raises(ValueError, match="idx holds ids outside"):
        GPT(GPTConfig(20, 32, 4, 1))(torch.tensor([[25]]))


def test_config_defaults():
    # the defaults the public API documents: one core block looped 4 times, nothing else
    cfg = LoopLMConfig(vocab_size=20, d_model=32, n_heads=4)
    assert (cfg.n_prelude, cfg.n_core, cfg.n_coda, cfg.n_loops) == (0, 1, 0, 4)
    assert (cfg.exit_gate, cfg.injection, cfg.init_state, cfg.norm_style) == (False, "none", "embedding", "pre")
    assert cfg.tie_embeddings and cfg.d_hidden is None and cfg.max_seq_len == 256
    torch.manual_seed(0)
    assert LoopLM(cfg)(torch.randint(0, 20, (1, 3))).logits.shape == (4, 1, 3, 20)


def test_oversized_models_are_refused():
    from looplm.model import _check_fits_in_memory

    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[1, 2147483647\], got 10+"):
        LoopLMConfig(vocab_size=10**15, d_model=64, n_heads=4)
    # each too large for any machine: a clear error before anything is allocated
    with pytest.raises(ValueError, match=r"max_seq_len=10+ makes this model too large: .* GiB"):
        LoopLM(LoopLMConfig(vocab_size=20, d_model=64, n_heads=4, max_seq_len=10**15))
    with pytest.raises(ValueError, match=r"vocab_size=2147483647 makes this model too large"):
        GPT(GPTConfig(vocab_size=2**31 - 1, d_model=4096, n_heads=32, n_layers=1))
    # the estimate against a given budget: 1,000 x 64 tied embedding floats are 256,000 bytes
    small = LoopLMConfig(vocab_size=1000, d_model=64, n_heads=4, max_seq_len=8)
    _check_fits_in_memory(small, 1, available=2**30)
    with pytest.raises(ValueError, match="vocab_size=1000 makes this model too large"):
        _check_fits_in_memory(small, 0, available=255_000)


def test_state0_and_generator_arguments():
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, n_loops=2))
    idx = torch.randint(0, 20, (2, 5))
    x0 = model.embed(idx)
    # h_0 = x0 given explicitly is the default start
    torch.testing.assert_close(model(idx, state0=x0).logits, model(idx).logits, rtol=0, atol=0)
    assert not torch.equal(model(idx, state0=torch.zeros_like(x0)).logits, model(idx).logits)
    with pytest.raises(ValueError, match=r"state0 must have shape \[B, T, d_model\] = \[2, 5, 32\]"):
        model(idx, state0=x0[:, :3])
    with pytest.raises(TypeError, match="state0 must be a floating-point tensor"):
        model(idx, state0=idx)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        model(idx, generator=0)

# --- book/02_one_step_is_a_gpt.py, cell 140 ---
class _HalfGate(torch.nn.Module):
    """A stand-in exit gate: λ = 1/2 everywhere, exit_probs uniform over the steps."""

    def __init__(self, config):
        super().__init__()

    def forward(self, z):
        return torch.full(z.shape[:-1], 0.5)                  # (B, T)

    def exit_probs(self, gate):
        return torch.full_like(gate, 1.0 / gate.shape[0])     # (S, B, T)


def test_registries_and_exit_gate_hook():
    assert isinstance(INJECTIONS["none"](None), NoInjection)
    assert isinstance(INIT_STATES["embedding"](None), EmbeddingInit)
    saved = dict(EXIT_GATES)
    try:
        EXIT_GATES.clear()
        with pytest.raises(ValueError, match="no exit gate is available yet"):
            LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, exit_gate=True)
        EXIT_GATES["half"] = _HalfGate
        with pytest.raises(ValueError, match="gate_head must be one of 'half'; got 'linear'"):
            LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, exit_gate=True)
        torch.manual_seed(0)
        model = LoopLM(LoopLMConfig(vocab_size=20, d_model=32, n_heads=4, n_loops=3,
                                    exit_gate=True, gate_head="half"))
        out = model(torch.randint(0, 20, (2, 5)))
        assert out.gate.shape == out.exit_probs.shape == (3, 2, 5)
        torch.testing.assert_close(out.exit_probs.sum(0), torch.ones(2, 5))
    finally:
        EXIT_GATES.clear()
        EXIT_GATES.update(saved)
