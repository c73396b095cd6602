# Generated from book/02_one_step_is_a_gpt.py: edit the chapter, then run `make export`.

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from looplm.block import NORM_STYLES
from looplm.data import IGNORE_INDEX
from looplm.model import (  # noqa: F401
    MAX_VOCAB_SIZE,
    GPTConfig,
    GPT,
    NoInjection,
    EmbeddingInit,
    INJECTIONS,
    INIT_STATES,
    EXIT_GATES,
    ATTENTIONS,
    MLPS,
    CONFIG_CHECKS,
    KERNEL_BACKENDS,
    LoopLMConfig,
    LoopOutput,
    token_losses,
    LoopLM,
    gpt_param_count,
    looplm_param_count,
)

# --- book/02_one_step_is_a_gpt.py:1262 (cell 101) ---
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

# --- book/02_one_step_is_a_gpt.py:1313 (cell 103) ---
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

# --- book/02_one_step_is_a_gpt.py:1358 (cell 105) ---
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

# --- book/02_one_step_is_a_gpt.py:1626 (cell 121) ---
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
