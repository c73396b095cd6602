# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 8: Real looped models: Ouro and Huginn, exactly
#
# Two looped language models have been trained at scale and released with their weights.
# **Ouro** {cite:p}`zhu2025ouro,ouro-model-card` loops a whole 24- or 48-layer stack four
# times and learns when to stop. **Huginn-0125** {cite:p}`geiping2025huginn,huginn-model-card`
# runs a prelude of two blocks, loops a core of four blocks 32 times by default from a random
# start, and reads out through a coda of two. Every idea they use has appeared in this book.
# What has not appeared are the details that make a network compute *their* function and not
# a near neighbour: where a norm sits, which rows of a projection belong to which rotary pair,
# how a scale enters the embedding.
#
# This chapter closes that gap. By its end `looplm.convert.load_pretrained(folder)` turns a
# folder holding a released checkpoint (`config.json` plus `*.safetensors`) into a `LoopLM`
# that computes what the published code computes, step by step. No checkpoint is downloaded
# here: we write small random checkpoints in each public format, and check the converted models
# against references written from the papers and the public code.

# %% [markdown]
# The plan:
#
# 1. what the two models compute, side by side with `looplm`'s defaults;
# 2. grouped-query attention, and what it saves in a looped model's KV cache;
# 3. a bias on queries and keys, and the two ways to pair rotary dimensions;
# 4. three switches in the loop: the normed state fed back, a norm before the coda, a scaled
#    embedding; and an explicit initial state;
# 5. independent references of both forwards, in plain tensor code;
# 6. `looplm.convert`: published keys and config fields to a `LoopLM`, with clear errors;
# 7. the check, per step, in float64 and float32;
# 8. the knobs users of the released models ask for: exit threshold, exit step, weighted exit,
#    and whether an exited token still runs the deeper steps;
# 9. what skipping those steps costs, on a trained model over three seeds;
# 10. the commands that load the released checkpoints, and where `looplm` chooses differently.
#
# The model options go to the modules that own the pieces (`looplm/block.py`,
# `looplm/model.py`, `looplm/generate`); the converter is `looplm/convert.py`, and the
# references are in `looplm/testing.py`. The next cell names the converter's module; the one
# after it holds its imports.

# %%
#| default_exp convert

# %% tags=["hide-input"]
#| export
import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from looplm.block import RotaryEmbedding, rope_angles
from looplm.exits import FixedDepth, QExit
from looplm.model import LoopLM, LoopLMConfig

# %% tags=["hide-input"]
import inspect
import tempfile

import matplotlib.pyplot as plt
import torch.nn.functional as F
from torch import nn

import looplm
from looplm.block import CausalSelfAttention, _check_hidden, apply_rope
from looplm.checks import require_int
from looplm.experiments import _ch07_prefix, _ch07_setup
from looplm.generate import generate
from looplm.model import ATTENTIONS, CONFIG_CHECKS
from looplm.testing import run_tests

torch.set_num_threads(1)  # tiny models gain nothing from more threads, and results stay the same
_ = torch.manual_seed(0)
print("torch", torch.__version__, "| looplm", looplm.__version__)

# %% [markdown]
# ## 8.1 What the two models compute
#
# Both follow the shape of chapter 2: embed, an optional prelude, a core applied $S$ times with
# shared weights, a readout after the core. The table lists every place where they differ from
# each other or from `looplm`'s defaults, from their code {cite:p}`ouro-modeling-code,huginn-code`:
#
# | | Ouro 1.4B / 2.6B | Huginn-0125 | `looplm` default |
# |---|---|---|---|
# | parts | no prelude, core = all 24 / 48 layers, no coda | prelude 2, core 4, coda 2 | 0, 1, 0 |
# | steps $S$ | 4 (`total_ut_steps`) | 32 (`mean_recurrence`) | 4 |
# | block norms | sandwich: $h + n_2(\mathrm{Attn}(n_1 h))$ | after the add: $n_2(h + \mathrm{Attn}(n_1 h))$ | pre-norm |
# | state fed back | $\mathrm{norm}(h_t)$, the final norm inside the loop | raw $h_t$ | raw $h_t$ |
# | injection, $h_0$ | none, $h_0 = $ embedding | adapter$([h; x_0])$, random $h_0$ | none, embedding |
# | embedding | plain | times $\sqrt{d}$ | plain |
# | attention | 16 query, 16 key/value heads; fewer allowed | 55 heads, a learned bias on $q$ and $k$ | no bias, $n_{kv} = n_h$ |
# | rotary pairs | $(i, i + h_s/2)$, base $10^6$ | $(2i, 2i{+}1)$, base 50,000 | $(i, i + h_s/2)$ |
# | readout | norm, head (untied) | norm, coda, the *same* norm, head (tied) | coda, norm, head |
# | stopping | an exit gate, threshold on its CDF | a KL or entropy test between steps | none |
#
# The first three rows are settings `looplm` has had since chapters 1–3. The rest are new
# config fields, each of which changes nothing at its default. Sections 8.2–8.4 build them.

# %% [markdown]
# ## 8.2 Grouped-query attention
#
# In chapter 1's attention every query head has its own key and value head. Grouped-query
# attention {cite:p}`ainslie2023gqa` keeps $n_h$ query heads but only $n_{kv}$ key/value
# heads, with $n_h$ a multiple of $n_{kv}$: query heads $j r, \dots, (j+1) r - 1$ share
# key/value head $j$, where $r = n_h / n_{kv}$. For a query head $i$,
#
# $$y_i = \mathrm{softmax}\!\left(\frac{q_i k_{\lfloor i / r \rfloor}^\top}{\sqrt{h_s}} + M\right) v_{\lfloor i / r \rfloor}.$$
#
# The released Ouro models use $n_{kv} = n_h = 16$, but its code allows fewer, and the reason
# to care is the cache: a KV cache stores $n_{kv}$ heads, not $n_h$. Ouro's code, like Llama's,
# expands the shared heads with `repeat_kv`, which is `repeat_interleave` along the head
# dimension. The layer is a subclass of chapter 1's: only the projection and the split change,
# and `project_qkv` hands back $k$ and $v$ with $n_{kv}$ heads, so that a cache stores each
# shared head once.

# %%
#| export block
def repeat_kv(x, n_rep):
    """[B, n_kv, T, hs] -> [B, n_kv * n_rep, T, hs]: key/value head j serves query heads
    j * n_rep .. (j + 1) * n_rep - 1 (each head repeated n_rep times in a row)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class GroupedQueryAttention(CausalSelfAttention):
    """Causal self-attention with n_kv_heads key/value heads, each shared by n_heads // n_kv_heads
    query heads (arXiv 2305.13245), and optionally a learned bias on q and k before rope (Huginn).

    qkv.weight is [(n_heads + 2 n_kv_heads) hs, d_model]: the rows of q, then k, then v, head
    after head. qk_bias is [2, n_heads, hs] (q's, then k's), zeros at first; it needs
    n_kv_heads == n_heads, as in Huginn. project_qkv returns k and v with n_kv_heads heads.
    """

    def __init__(self, d_model, n_heads, n_kv_heads=None, qk_bias=False):
        super().__init__(d_model, n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else require_int("n_kv_heads", n_kv_heads, 1, n_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        if qk_bias and n_kv_heads != n_heads:
            raise ValueError(f"qk_bias=True needs n_kv_heads == n_heads (as in Huginn), got "
                             f"n_kv_heads={n_kv_heads}, n_heads={n_heads}")
        self.n_kv_heads, self.kv_dim = n_kv_heads, n_kv_heads * self.head_dim
        self.qkv = nn.Linear(d_model, d_model + 2 * self.kv_dim, bias=False)     # W_q | W_k | W_v
        self.qk_bias = nn.Parameter(torch.zeros(2, n_heads, self.head_dim)) if qk_bias else None

    def project_qkv(self, x, cos, sin):
        """x [B, T, C] -> q [B, nh, T, hs] and k, v [B, n_kv_heads, T, hs], rope on q and k."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([C, self.kv_dim, self.kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)          # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2) for t in (k, v))
        if self.qk_bias is not None:                  # one bias vector per head, before the rotation
            q, k = q + self.qk_bias[0][:, None], k + self.qk_bias[1][:, None]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, attend=None):
        """As CausalSelfAttention; attend(q, k, v) gets k and v with n_kv_heads heads."""
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.d_model or not x.is_floating_point():
            _check_hidden(x, self.d_model)
        q, k, v = self.project_qkv(x, cos, sin)
        if attend is None:
            n_rep = self.n_heads // self.n_kv_heads
            y = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True)
        else:
            y = attend(q, k, v)
        return self.project_out(y)

    def extra_repr(self):
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, qk_bias={self.qk_bias is not None}"

# %% [markdown]
# Chapter 2 left a registry for it, `ATTENTIONS`, as it did for the exit gate. A config with
# `n_kv_heads` below `n_heads`, or with `qk_bias=True`, builds every block with this layer;
# any other config keeps chapter 1's, so its models are unchanged bit for bit. Chapter 7's cache
# already sizes itself by `config.kv_heads` and expands shared heads when it attends.

# %%
#| export model
from looplm.block import GroupedQueryAttention


def _grouped_attention(config):
    return GroupedQueryAttention(config.d_model, config.n_heads, config.n_kv_heads, config.qk_bias)


ATTENTIONS["grouped"] = _grouped_attention

# %% [markdown]
# This chapter's config fields get their checks here, added to chapter 2's `CONFIG_CHECKS`,
# which every `LoopLMConfig` runs: simple ranges, and two rules. A feedback norm (section 8.4)
# needs a model without a coda, since the head reads the fed-back state directly; and the bias
# on queries and keys needs as many key/value heads as query heads, as in Huginn.

# %%
#| export model
from looplm.checks import require_bool, require_int, require_number


def _validate_published_options(cfg):
    if cfg.n_kv_heads is not None:
        require_int("n_kv_heads", cfg.n_kv_heads, 1, cfg.n_heads)
        if cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(f"n_kv_heads={cfg.n_kv_heads} must divide n_heads={cfg.n_heads}: each key/value "
                             f"head serves the same number of query heads")
    require_bool("qk_bias", cfg.qk_bias)
    if cfg.qk_bias and cfg.kv_heads != cfg.n_heads:
        raise ValueError(f"qk_bias=True needs n_kv_heads == n_heads (as in Huginn), got n_kv_heads={cfg.n_kv_heads}")
    require_number("embed_scale", cfg.embed_scale, 0, low_open=True)
    require_bool("feedback_norm", cfg.feedback_norm)
    require_bool("norm_before_coda", cfg.norm_before_coda)
    require_number("init_state_std", cfg.init_state_std, 0, low_open=True)
    if cfg.feedback_norm and (cfg.n_coda or cfg.norm_before_coda):
        raise ValueError(f"feedback_norm=True makes the final norm the last op of every step, which the head "
                         f"then reads directly; it needs n_coda=0 and norm_before_coda=False, got "
                         f"n_coda={cfg.n_coda}, norm_before_coda={cfg.norm_before_coda}")


CONFIG_CHECKS["published models"] = _validate_published_options

# %% [markdown]
# Three properties pin the layer down. With $n_{kv} = n_h$ and no bias it *is* chapter 1's
# attention, given the same weights; with fewer heads it equals the formula above written out
# with `attention_reference`; and a model built with it decodes through the cache exactly as
# it computes a full forward.

# %% tags=["remove-cell"]
#| test
import math

import pytest
import torch

from looplm.block import CausalSelfAttention, GroupedQueryAttention, RotaryEmbedding, attention_reference
from looplm.model import LoopLM, LoopLMConfig, looplm_param_count
from looplm.generate import generate
from looplm.testing import recompute_greedy


def test_gqa_with_all_heads_is_chapter_1s_attention():
    torch.manual_seed(0)
    mha, gqa = CausalSelfAttention(32, 4), GroupedQueryAttention(32, 4, n_kv_heads=4)
    gqa.load_state_dict(mha.state_dict())                     # same keys, same shapes
    cos, sin = RotaryEmbedding(8, 16)(10)
    x = torch.randn(2, 10, 32)
    assert torch.equal(gqa(x, cos, sin), mha(x, cos, sin))


def test_gqa_equals_the_written_out_formula():
    torch.manual_seed(1)
    for n_kv in (1, 2, 4):
        attn = GroupedQueryAttention(32, 4, n_kv_heads=n_kv).double()
        cos, sin = RotaryEmbedding(8, 16).double()(9)
        x = torch.randn(2, 9, 32, dtype=torch.float64)
        q, k, v = attn.project_qkv(x, cos, sin)
        assert k.shape == v.shape == (2, n_kv, 9, 8)
        r = 4 // n_kv
        heads = [attention_reference(q[:, i:i + 1], k[:, i // r:i // r + 1], v[:, i // r:i // r + 1])
                 for i in range(4)]                           # query head i reads kv head i // r
        expected = attn.proj(torch.cat(heads, 1).transpose(1, 2).reshape(2, 9, 32))
        torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-12, rtol=0)


def test_gqa_models_count_their_parameters_and_decode_like_recomputing():
    for n_kv in (1, 2):
        torch.manual_seed(n_kv)
        cfg = LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_kv_heads=n_kv, n_prelude=1, n_coda=1,
                           n_loops=3, max_seq_len=40)
        model = LoopLM(cfg)
        assert sum(p.numel() for p in model.parameters()) == looplm_param_count(cfg)
        assert model.core[0].attn.qkv.weight.shape == (32 + 2 * 8 * n_kv, 32)
        res = generate(model, [[1, 5, 7, 3]], 6)
        tokens, logits = recompute_greedy(model, [1, 5, 7, 3], 6)
        assert torch.equal(res.new_tokens[0], tokens)
        torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)


def test_default_configs_keep_chapter_1s_attention():
    model = LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_kv_heads=4))
    assert type(model.core[0].attn) is CausalSelfAttention
    with pytest.raises(ValueError, match="n_kv_heads"):
        LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="qk_bias"):
        GroupedQueryAttention(32, 4, n_kv_heads=2, qk_bias=True)


run_tests(test_gqa_with_all_heads_is_chapter_1s_attention, test_gqa_equals_the_written_out_formula,
          test_gqa_models_count_their_parameters_and_decode_like_recomputing,
          test_default_configs_keep_chapter_1s_attention)

# %% [markdown]
# ### What it saves in a loop
#
# A looped model's cache holds one entry per (step, block), chapter 7's invariant. For Ouro
# that is $4 \times 24 = 96$ slots for the 1.4B model, each holding keys and values of
# $n_{kv} h_s$ numbers per token:
#
# $$\text{bytes per token} = 2 \cdot S \cdot L \cdot n_{kv} \cdot h_s \cdot \text{bytes per number}.$$
#
# The same arithmetic for the released sizes, in bfloat16, with the $n_{kv} = 16$ they ship and
# the fewer heads GQA would allow:

# %% tags=["nbval-check-output"]
print(f"{'model':10s} {'slots':>5s} {'n_kv':>4s} {'KiB/token':>9s} {'GiB at 4K':>9s} {'GiB at 32K':>10s}")
for name, layers in (("Ouro-1.4B", 24), ("Ouro-2.6B", 48)):
    for n_kv in (16, 4, 1):
        per_token = 2 * 4 * layers * n_kv * 128 * 2
        print(f"{name:10s} {4 * layers:5d} {n_kv:4d} {per_token / 2**10:9.0f} {per_token * 4096 / 2**30:9.2f} "
              f"{per_token * 32768 / 2**30:10.1f}")

# %% [markdown]
# A looped model pays its step count in cache memory: Ouro-1.4B at 32K tokens needs 24 GiB,
# four times a 24-layer GPT of the same width. Four key/value heads would bring it to 6 GiB.
# The same numbers against the context length:

# %% tags=["hide-input"]
tokens = [2**k for k in range(10, 17)]
fig, ax = plt.subplots(figsize=(7, 3.6))
for label, slots, n_kv, style, marker in (
        ("Ouro-1.4B: 4 steps x 24 layers, 16 kv heads", 96, 16, "-", "o"),
        ("the same, 4 kv heads (GQA)", 96, 4, "--", "s"),
        ("its 24 layers run once (a GPT), 16 kv heads: the same as GQA-4", 24, 16, ":", "x")):
    ax.plot(tokens, [2 * slots * n_kv * 128 * 2 * t / 2**30 for t in tokens], style, marker=marker,
            markersize=9 if marker == "s" else 6, fillstyle="none" if marker == "s" else "full", label=label)
ax.set(xscale="log", yscale="log", xlabel="tokens in the cache", ylabel="KV cache, GiB (bfloat16)",
       title="A looped model's cache grows with its steps; GQA divides it by n_h / n_kv")
ax.set_xticks(tokens, [f"{t // 1024}K" for t in tokens])
ax.grid(alpha=0.3, which="both")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# The cache `generate` builds follows the formula; here for a small model with 4 query heads:

# %% tags=["nbval-check-output"]
prompt = [[1, 5, 7, 3, 9, 2]]
for n_kv in (4, 2, 1):
    torch.manual_seed(0)
    small = LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_kv_heads=n_kv, n_core=2, n_loops=4,
                                max_seq_len=40))
    res = generate(small, prompt, 9)
    formula = 2 * 1 * n_kv * 8 * 4 * (2 * (4 * 6 + 4 * 8))        # 2 B n_kv hs bytes (n_core (S Tp + S N))
    print(f"n_kv_heads={n_kv}: cache {res.cache_bytes:6d} bytes, formula {formula:6d}")

# %% tags=["remove-cell"]
#| test
def test_gqa_cache_bytes_match_the_formula():
    for n_kv, layout in ((1, dict(n_prelude=1, n_core=2, n_coda=1)), (2, dict(n_core=3))):
        torch.manual_seed(0)
        cfg = LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_kv_heads=n_kv, n_loops=3, max_seq_len=40, **layout)
        res = generate(LoopLM(cfg), [[1, 5, 7, 3, 9]], 8, cache="mod-2")
        P, C, K, S, Tp, N, slots = cfg.n_prelude, cfg.n_core, cfg.n_coda, 3, 5, 7, 2
        positions = P * (Tp + N) + (C + K) * (S * Tp + slots * N)
        assert res.cache_bytes == 2 * 1 * n_kv * cfg.head_dim * 4 * positions


run_tests(test_gqa_cache_bytes_match_the_formula)

# %% [markdown]
# ## 8.3 A bias on queries and keys, and two ways to pair rotary dimensions
#
# Huginn adds a learned vector to every query head and every key head before the rotation
# {cite:p}`huginn-code`: $q_i \leftarrow q_i + b^q_i$, $k_i \leftarrow k_i + b^k_i$, stored as
# one tensor `qk_bias` of shape $[2, 1, n_h, h_s]$. The layer above carries it as `qk_bias`
# $[2, n_h, h_s]$. A bias before RoPE is not a bias after it: the rotation turns $b$ by an angle
# that depends on the position, so the model can learn position-dependent offsets.
#
# The second difference is invisible in the formulas. RoPE rotates pairs of dimensions, and
# which dimensions form a pair is a convention. Chapter 1, Llama and Ouro pair dimension $i$
# with $i + h_s/2$ ("rotate half"); Huginn pairs $2i$ with $2i{+}1$, as a complex number. Pair
# $i$ turns by the same angle $m\,\theta^{-2i/h_s}$ in both. So reordering the rows of $W_q$ and
# $W_k$ within each head, so that old rows $2i$ and $2i{+}1$ become new rows $i$ and
# $i + h_s/2$, turns one convention into the other: the new row $j$ is the old row
# $\pi(j)$ with
#
# $$\pi = (0, 2, 4, \dots, h_s - 2,\; 1, 3, \dots, h_s - 1).$$
#
# The scores $q \cdot k$ do not change, because $q$ and $k$ are reordered alike, and the bias
# must be reordered with them. $W_v$ keeps its rows.

# %%
#| export
def pairs_to_halves(rows, n_heads, head_dim):
    """Reorder the rows [n_heads * head_dim, ...] of a q or k projection (or a flattened bias)
    whose heads rotate pairs (2i, 2i+1), for rope that rotates pairs (i, i + hs/2): new row j of
    each head is old row perm[j], perm = (0, 2, ..., hs - 2, 1, 3, ..., hs - 1)."""
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return rows.reshape(n_heads, head_dim, *rows.shape[1:])[:, perm].reshape(rows.shape)

# %% [markdown]
# The test is the one that matters: rotate with Huginn's pairs on the original rows, rotate with
# chapter 1's `apply_rope` on the reordered rows, and compare the attention scores, in float64.

# %% tags=["nbval-check-output"]
def rotate_pairs(x, angles):
    """Huginn's convention: (x_2i, x_2i+1) turned by angles[..., i], as a complex number."""
    pairs = x.unflatten(-1, (-1, 2))
    c, s = angles.cos(), angles.sin()
    return torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 1] * c + pairs[..., 0] * s], -1).flatten(-2)


torch.manual_seed(0)
n_h, h_s, T = 2, 8, 6
w_q, w_k = torch.randn(n_h * h_s, 16, dtype=torch.float64), torch.randn(n_h * h_s, 16, dtype=torch.float64)
x = torch.randn(1, T, 16, dtype=torch.float64)
angles = torch.outer(torch.arange(T, dtype=torch.float64), 5e4 ** (-torch.arange(0, h_s, 2, dtype=torch.float64) / h_s))
heads = lambda w: (x @ w.T).view(1, T, n_h, h_s).transpose(1, 2)              # (1, n_h, T, h_s)
huginn_scores = rotate_pairs(heads(w_q), angles) @ rotate_pairs(heads(w_k), angles).transpose(-1, -2)
cos, sin = angles.cos(), angles.sin()
ours = apply_rope(heads(pairs_to_halves(w_q, n_h, h_s)), cos, sin) @ \
    apply_rope(heads(pairs_to_halves(w_k, n_h, h_s)), cos, sin).transpose(-1, -2)
print(f"max |scores difference|: {(huginn_scores - ours).abs().max().item():.1e} "
      f"(scores up to {huginn_scores.abs().max().item():.0f})")
print(f"without the reordering:  {(huginn_scores - apply_rope(heads(w_q), cos, sin) @ apply_rope(heads(w_k), cos, sin).transpose(-1, -2)).abs().max().item():.1e}")

# %% [markdown]
# ## 8.4 Three switches in the loop, and the initial state
#
# **The normed state fed back (Ouro).** `looplm`'s loop feeds the raw state $h_t$ to the next
# step and normalises only for the readout, $z_t = \mathrm{norm}(h_t)$. Ouro's code applies its
# final norm inside the loop: its output is both the readout state and the next step's input.
#
# $$\text{looplm: } h_t = f(h_{t-1}),\ z_t = \mathrm{norm}(h_t) \qquad
#   \text{Ouro: } h_t = \mathrm{norm}(f(h_{t-1})),\ z_t = h_t.$$
#
# Step 1 is the same in both; from step 2 on they differ, since one step's input is a unit-RMS
# vector times the norm's gain and the other's is whatever the residual stream grew to.
# `feedback_norm=True` selects Ouro's version. It needs a model without a coda, as Ouro is: the
# head reads the fed-back state directly.
#
# **A norm before the coda (Huginn).** Huginn normalises the core's output before its coda, and
# again after it, with *one* norm module: `ln_f` is used twice. `norm_before_coda=True` runs
# `looplm`'s final norm at both places. The state fed back stays raw.
#
# **A scaled embedding (Huginn).** Huginn multiplies the embedding by $\sqrt{d}$ and ties its
# head to the unscaled matrix, so the scale cannot be folded into the weights without untying
# them. `embed_scale` multiplies the embedding in `encode`.
#
# **The initial state.** Huginn starts its loop from a truncated normal, drawn fresh per
# forward: $\sigma = $ `init_values["std"]` $\cdot \sqrt{d} = \sqrt{2/(5d)}\cdot\sqrt{d} =
# \sqrt{2/5}$ for Huginn-0125, truncated at $\pm 3\sigma$. That is chapter 3's
# `init_state="random"`, with $\sigma$ now the field `init_state_std`. A random start matches in
# distribution, never draw for draw, so every equality check below passes the start explicitly:
# `model(idx, state0=h0)` uses $h_0$ [B, T, d] instead of the config's initial state. The same
# argument serves path-independence experiments: run one input from many starts and compare.
#
# The four options are one line each in chapter 2's `encode`, `step` and `readout` and chapter
# 3's `RandomInit`, which this book prints rather than repeats:

# %% tags=["nbval-check-output"]
for method in (LoopLM.step, LoopLM.readout):
    print(inspect.getsource(method).split('"""')[-1].rstrip(), "\n")

# %% [markdown]
# Each is checked against its formula, on a model small enough to write the formula out:

# %% tags=["remove-cell"]
#| test
def _tiny(**options):
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_loops=3, max_seq_len=40, **options))
    with torch.no_grad():                                      # gains that are not 1 catch a missing norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model.double()


def test_feedback_norm_feeds_the_normed_state_back():
    model = _tiny(feedback_norm=True, exit_gate=True)
    idx = torch.randint(0, 23, (2, 7))
    out = model(idx, return_hidden=True)
    cos, sin = model.rope(7)
    h = model.embed(idx)
    for t in range(3):
        for block in model.core:
            h = block(h, cos, sin)
        h = model.norm(h)                                      # inside the loop
        torch.testing.assert_close(out.hidden[t], h, atol=1e-12, rtol=0)
        torch.testing.assert_close(out.logits[t], model.lm_head(h), atol=1e-12, rtol=0)
        torch.testing.assert_close(out.gate[t], torch.sigmoid(model.exit_gate.proj(h))[..., 0], atol=1e-12, rtol=0)
    plain = _tiny(exit_gate=True)
    plain.load_state_dict(model.state_dict())
    other = plain(idx)
    torch.testing.assert_close(other.logits[0], out.logits[0], atol=1e-12, rtol=0)   # step 1: the same
    assert (other.logits[1] - out.logits[1]).abs().max() > 1e-3                       # then not
    with pytest.raises(ValueError, match="n_coda"):
        LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_coda=1, feedback_norm=True)


def test_norm_before_coda_and_embed_scale():
    model = _tiny(n_prelude=1, n_coda=1, injection="concat", init_state="random", norm_before_coda=True,
                  embed_scale=math.sqrt(32))
    idx = torch.randint(0, 23, (2, 6))
    h0 = torch.randn(2, 6, 32, dtype=torch.float64)
    out = model(idx, state0=h0)
    cos, sin = model.rope(6)
    x0 = model.prelude[0](model.embed(idx) * math.sqrt(32), cos, sin)
    h = h0
    for t in range(3):
        h = model.core[0](model.injection.adapter(torch.cat([h, x0], -1)), cos, sin)
        z = model.norm(model.coda[0](model.norm(h), cos, sin))           # one norm, used twice
        torch.testing.assert_close(out.logits[t], model.lm_head(z), atol=1e-12, rtol=0)


def test_random_start_has_its_std_and_state0_replaces_it():
    model = _tiny(injection="add", init_state="random", init_state_std=0.3)
    h0 = model.init_state(torch.zeros(64, 64, 32, dtype=torch.float64))
    truncated = 0.3 * 0.98658                                   # the ±3σ truncation shrinks the std
    assert abs(h0.std().item() - truncated) < 0.01 and h0.abs().max() <= 0.9
    idx = torch.randint(0, 23, (1, 5))
    start = torch.randn(1, 5, 32, dtype=torch.float64)
    assert torch.equal(model(idx, state0=start).logits, model(idx, state0=start).logits)
    assert not torch.equal(model(idx).logits, model(idx).logits)          # fresh draws without one


def test_weighted_logits_average_the_steps():
    model = _tiny(exit_gate=True)
    out = model(torch.randint(0, 23, (2, 5)))
    expected = sum(out.exit_probs[t][..., None] * out.logits[t] for t in range(3))
    torch.testing.assert_close(out.weighted_logits, expected, atol=1e-12, rtol=0)
    assert _tiny()(torch.randint(0, 23, (1, 3))).weighted_logits is None       # no gate: none


run_tests(test_feedback_norm_feeds_the_normed_state_back, test_norm_before_coda_and_embed_scale,
          test_random_start_has_its_std_and_state0_replaces_it, test_weighted_logits_average_the_steps)

# %% [markdown]
# ## 8.5 Independent references
#
# A converted model is only as trustworthy as what it is compared with. The references below
# are written from the papers and the public code {cite:p}`ouro-modeling-code,huginn-code`,
# and share nothing with `looplm`'s modules: they read tensors by their *published* names,
# build their own rotary tables in each model's convention, and write attention out as
# $\mathrm{softmax}(q k^\top/\sqrt{h_s} + M)\,v$. Each comment names the lines of the public
# code it follows. One deliberate difference: every operation runs in the weights' precision,
# at least float32. Both public codes force float32 in their norms and rotary tables, so a
# float64 run of them is only float32-accurate; our references in float64 are float64-accurate,
# which is what makes a $10^{-12}$ check possible.
#
# We ran these references against the public modeling files themselves, under `transformers`
# 4.54.1, outside this book (it needs the `transformers` package, which the book does not
# depend on): in float32 the largest relative difference over per-step logits, gates, exit
# probabilities and every exit branch was $3.6 \times 10^{-7}$ for Ouro and $2.4 \times
# 10^{-7}$ for Huginn; with the public code's float32 casts widened to float64, $7.1 \times
# 10^{-16}$ and $5.2 \times 10^{-16}$. The converted models of section 8.6 were checked the same
# way, including greedy decoding with each code's own KV cache: the same tokens, and logits
# within $5 \times 10^{-7}$ relative in float32. Two things in the public code needed a scratch
# patch to run under that `transformers` version, neither of which touches the math: Ouro's
# cache reports a mask size one key short to eager attention (the default SDPA path does not
# use it), and Huginn's cache class cannot set an attribute that the library now defines as a
# property.

# %%
#| export testing
import math

import torch
import torch.nn.functional as F


def _rms(x, gain, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def _softmax_attention(q, k, v):
    """softmax(q kᵀ / sqrt(hs) + causal mask) v, q, k, v [B, H, T, hs]."""
    T = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


def ouro_reference(sd, cfg, ids, exit_threshold=None, exit_at_step=None):
    """OuroForCausalLM's forward (modeling_ouro.py), from Ouro's published key and field names.

    -> dict: hidden [S, B, T, d] (the normed state of each step, also the next step's input),
    step_logits [S, B, T, V], gates [S, B, T], pdf [S, B, T], expected_logits [B, T, V] and, for
    exit_threshold q, exit_steps [B, T] (0-based: the first step whose CDF reaches q, else the
    last) and logits [B, T, V] read out there; exit_at_step k (0-based) reads out step k.
    """
    dt = torch.promote_types(sd["model.embed_tokens.weight"].dtype, torch.float32)
    w = lambda name: sd[name].to(dt)                                           # noqa: E731
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV, hd = cfg.get("num_key_value_heads") or H, cfg.get("head_dim") or d // H
    S, eps, B, T = cfg.get("total_ut_steps", 4), cfg.get("rms_norm_eps", 1e-6), *ids.shape
    # rotate-half tables: emb = cat(freqs, freqs) [modeling_ouro.py 480-501]
    inv_freq = 1.0 / cfg.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, dtype=dt) / hd)
    emb = torch.outer(torch.arange(T, dtype=dt), inv_freq).repeat(1, 2)
    cos, sin = emb.cos(), emb.sin()
    rope = lambda x: x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin  # noqa: E731
    head = w("lm_head.weight") if "lm_head.weight" in sd else w("model.embed_tokens.weight")
    h, hidden, gate_logits = w("model.embed_tokens.weight")[ids], [], []   # no embedding scale
    for _ in range(S):                                                      # [modeling_ouro.py 604-620]
        for l in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{l}."
            a = _rms(h, w(p + "input_layernorm.weight"), eps)
            q = (a @ w(p + "self_attn.q_proj.weight").T).view(B, T, H, hd).transpose(1, 2)
            k = (a @ w(p + "self_attn.k_proj.weight").T).view(B, T, KV, hd).transpose(1, 2)
            v = (a @ w(p + "self_attn.v_proj.weight").T).view(B, T, KV, hd).transpose(1, 2)
            k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)   # repeat_kv
            y = _softmax_attention(rope(q), rope(k), v).transpose(1, 2).reshape(B, T, H * hd)
            h = h + _rms(y @ w(p + "self_attn.o_proj.weight").T, w(p + "input_layernorm_2.weight"), eps)
            m = _rms(h, w(p + "post_attention_layernorm.weight"), eps)         # sandwich [413-435]
            m = (F.silu(m @ w(p + "mlp.gate_proj.weight").T) * (m @ w(p + "mlp.up_proj.weight").T)) \
                @ w(p + "mlp.down_proj.weight").T
            h = h + _rms(m, w(p + "post_attention_layernorm_2.weight"), eps)
        h = _rms(h, w("model.norm.weight"), eps)                           # the norm inside the loop
        hidden.append(h)
        gate_logits.append((h @ w("model.early_exit_gate.weight").T)[..., 0] + w("model.early_exit_gate.bias"))
    hidden = torch.stack(hidden)
    gates, step_logits = torch.sigmoid(torch.stack(gate_logits)), hidden @ head.T
    pdf, remaining = [], torch.ones_like(gates[0])                          # [modeling_ouro.py 733-745]
    for t in range(S):
        pdf.append(gates[t] * remaining if t < S - 1 else remaining)
        remaining = remaining * (1 - gates[t])
    pdf = torch.stack(pdf)
    out = dict(hidden=hidden, step_logits=step_logits, gates=gates, pdf=pdf,
               expected_logits=(pdf[..., None] * step_logits).sum(0))
    if exit_at_step is not None:                                            # [modeling_ouro.py 787-791]
        out["logits"] = step_logits[exit_at_step]
    elif exit_threshold is not None:                                        # [modeling_ouro.py 792-812]
        reached = pdf.cumsum(0) >= exit_threshold
        steps = torch.where(reached.any(0), reached.float().argmax(0), S - 1)
        out["exit_steps"] = steps
        out["logits"] = step_logits.gather(0, steps[None, ..., None].expand(1, B, T, head.shape[0]))[0]
    return out


def huginn_reference(sd, cfg, ids, num_steps, state0):
    """RavenForCausalLM.forward(ids, input_states=state0, num_steps=(num_steps, 0)) in eval mode
    (raven_modeling_minimal.py), from Huginn's published names. -> logits [B, T, V]."""
    dt = torch.promote_types(sd["transformer.wte.weight"].dtype, torch.float32)
    w = lambda name: sd[name].to(dt)                                           # noqa: E731
    d, H = cfg["n_embd"], cfg.get("n_heads") or cfg["num_attention_heads"]
    hd, eps, B, T = d // H, cfg.get("norm_eps", 1e-6), *ids.shape
    # complex-pair tables: pair (2i, 2i+1) at angle m / base^(2i / hd) [raven_modeling_minimal.py 2076-2098]
    angles = torch.outer(torch.arange(T, dtype=dt),
                         1.0 / cfg.get("rope_base", 50000.0) ** (torch.arange(0, hd, 2, dtype=dt) / hd))
    c, s = angles.cos()[:, None], angles.sin()[:, None]                     # (T, 1, hd/2)

    def rope(x):                                                            # x (B, T, H, hd)
        re, im = x[..., 0::2], x[..., 1::2]
        return torch.stack([re * c - im * s, im * c + re * s], -1).flatten(-2)

    def block(x, p):                                                        # SandwichBlock [512-536]
        a = _rms(x, w(p + "norm_1.weight"), eps)
        q, k, v = (a @ w(p + "attn.Wqkv.weight").T).view(B, T, 3, H, hd).unbind(2)   # [q | k | v]
        if p + "attn.qk_bias" in sd:                                        # before rope [468-470]
            q, k = q + w(p + "attn.qk_bias")[0], k + w(p + "attn.qk_bias")[1]
        y = _softmax_attention(*(t.transpose(1, 2) for t in (rope(q), rope(k), v)))
        x = _rms(y.transpose(1, 2).reshape(B, T, d) @ w(p + "attn.proj.weight").T + x, w(p + "norm_2.weight"), eps)
        m = _rms(x, w(p + "norm_3.weight"), eps)
        gate, up = (m @ w(p + "mlp.fc.weight").T).chunk(2, -1)               # fc = [gate; up] [496-509]
        return _rms((F.silu(gate) * up) @ w(p + "mlp.proj.weight").T + x, w(p + "norm_4.weight"), eps)

    e = w("transformer.wte.weight")[ids] * math.sqrt(d)                     # emb_scale [50-52, 670]
    for i in range(cfg["n_layers_in_prelude"]):
        e = block(e, f"transformer.prelude.{i}.")
    x = state0.to(dt)
    for _ in range(num_steps):                                              # [764-781]
        x = torch.cat([x, e], -1) @ w("transformer.adapter.weight").T       # state first, then input
        for i in range(cfg["n_layers_in_recurrent_block"]):
            x = block(x, f"transformer.core_block.{i}.")
    x = _rms(x, w("transformer.ln_f.weight"), eps)                          # iterate_forward's ln_f [762]
    for i in range(cfg["n_layers_in_coda"]):
        x = block(x, f"transformer.coda.{i}.")
    x = _rms(x, w("transformer.ln_f.weight"), eps)                          # the same ln_f again [701]
    return x @ w("transformer.wte.weight").T                                # tied head, unscaled

# %% [markdown]
# The tests also need checkpoints. These write random tensors under every published key, with
# the published shapes, and configs with the published field names (tiny sizes). The norm gains
# are $1 + 0.1\,\mathcal{N}(0, 1)$ rather than ones, the gate and $q/k$ biases are not zero, and
# the embeddings are larger than the other weights, so that a swapped norm, a dropped bias or a
# misplaced scale changes the output.

# %%
#| export testing
TINY_OURO = dict(model_type="ouro", architectures=["OuroForCausalLM"], vocab_size=64, hidden_size=32,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=8, intermediate_size=48,
                 num_hidden_layers=2, total_ut_steps=3, rms_norm_eps=1e-6, rope_theta=1e6,
                 max_position_embeddings=64, tie_word_embeddings=False, hidden_act="silu",
                 early_exit_threshold=1.0)
TINY_HUGINN = dict(model_type="huginn_raven", architectures=["RavenForCausalLM"], n_embd=32, n_heads=4,
                   num_attention_heads=4, num_key_value_heads=4, intermediate_size=40, vocab_size=64,
                   padded_vocab_size=64, n_layers_in_prelude=1, n_layers_in_recurrent_block=2,
                   n_layers_in_coda=1, n_layers=4, mean_recurrence=3, block_size=64, rope_base=50000,
                   norm_eps=1e-6, qk_bias=True, bias=False, tie_embeddings=True, injection_type="linear",
                   state_init="like-init", block_class_name="SandwichBlock", norm_class_name="RMSNorm_llama",
                   mlp_class_name="GatedMLP", nonlin_name="SiLU",
                   init_values=dict(std=math.sqrt(2 / 160), out_proj=math.sqrt(2 / 160) / 4,
                                    embedding=math.sqrt(2 / 160), embed_scale=math.sqrt(32)))


def _draw(seed):
    g = torch.Generator().manual_seed(seed)
    normal = lambda shape, std: torch.randn(shape, generator=g, dtype=torch.float64) * std   # noqa: E731
    return normal, lambda n: 1 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)


def random_ouro_state_dict(cfg, seed=0, dtype=torch.float64):
    """Every key of an Ouro checkpoint for `cfg`, with random values (the same for every dtype)."""
    normal, gain = _draw(seed)
    d, V, I, H = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    KV, hd = cfg.get("num_key_value_heads") or H, cfg.get("head_dim") or d // H
    sd = {"model.embed_tokens.weight": normal((V, d), 0.2)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        for name, shape in (("q_proj", (H * hd, d)), ("k_proj", (KV * hd, d)), ("v_proj", (KV * hd, d)),
                            ("o_proj", (d, H * hd))):
            sd[p + f"self_attn.{name}.weight"] = normal(shape, 0.02)
        for name, shape in (("gate_proj", (I, d)), ("up_proj", (I, d)), ("down_proj", (d, I))):
            sd[p + f"mlp.{name}.weight"] = normal(shape, 0.02)
        for name in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"):
            sd[p + f"{name}.weight"] = gain(d)
    sd.update({"model.norm.weight": gain(d), "model.early_exit_gate.weight": normal((1, d), 0.2),
               "model.early_exit_gate.bias": normal((1,), 0.5)})
    if not cfg.get("tie_word_embeddings", False):
        sd["lm_head.weight"] = normal((V, d), 0.02)
    return {k: v.to(dtype) for k, v in sd.items()}


def huginn_freqs_cis(cfg):
    """Huginn's saved rope buffer [1, block_size, 1, hd/2, 2] (cos, sin), built in float32 as its code does."""
    hd = cfg["n_embd"] // (cfg.get("n_heads") or cfg["num_attention_heads"])
    inv_freq = 1.0 / cfg.get("rope_base", 50000.0) ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.outer(torch.arange(cfg["block_size"], dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], -1)[None, :, None]


def random_huginn_state_dict(cfg, seed=0, dtype=torch.float64, lm_head=True, freqs_cis=True):
    """Every key of a Huginn checkpoint for `cfg`; the stored lm_head is a copy of the embedding."""
    normal, gain = _draw(seed)
    d, I = cfg["n_embd"], cfg["intermediate_size"]
    V, H = cfg.get("padded_vocab_size", cfg["vocab_size"]), cfg.get("n_heads") or cfg["num_attention_heads"]
    sd = {"transformer.wte.weight": normal((V, d), 0.2)}
    for group, field in (("prelude", "n_layers_in_prelude"), ("core_block", "n_layers_in_recurrent_block"),
                         ("coda", "n_layers_in_coda")):
        for i in range(cfg[field]):
            p = f"transformer.{group}.{i}."
            sd.update({p + f"norm_{k}.weight": gain(d) for k in range(1, 5)})
            sd[p + "attn.Wqkv.weight"] = normal((3 * d, d), 0.02)
            if cfg.get("qk_bias", True):
                sd[p + "attn.qk_bias"] = normal((2, 1, H, d // H), 0.2)
            sd.update({p + "attn.proj.weight": normal((d, d), 0.02), p + "mlp.fc.weight": normal((2 * I, d), 0.02),
                       p + "mlp.proj.weight": normal((d, I), 0.02)})
    sd.update({"transformer.adapter.weight": normal((d, 2 * d), 0.02), "transformer.ln_f.weight": gain(d)})
    sd = {k: v.to(dtype) for k, v in sd.items()}
    if lm_head:
        sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()   # safetensors refuses shared storage
    if freqs_cis:
        sd["freqs_cis"] = huginn_freqs_cis(cfg)
    return sd

# %% [markdown]
# ## 8.6 Converting published checkpoints
#
# `looplm.convert` has three entry points:
#
# - `from_ouro(state_dict, config, **overrides)` and `from_huginn(state_dict, config,
#   **overrides)`: the tensors under the checkpoint's own key names and its `config.json` as a
#   dict, to a `LoopLM`. `overrides` are `LoopLMConfig` fields (`n_loops=8`,
#   `max_seq_len=4096`, `init_state="zeros"`), and `dtype=` casts the weights.
# - `load_pretrained(folder, **overrides)`: reads `config.json` and every `*.safetensors` file
#   {cite:p}`safetensors` in the folder, and picks the architecture from the config's
#   `model_type` (or `architectures`).
#
# Every field the converter reads is checked, and a value `looplm` cannot express (another
# activation, rotary scaling, sliding-window layers, an adapter bias, test-time noise) is an
# error naming the field: loading must never build a model that computes something else. The
# same for tensors: a missing or unexpected key, or a wrong shape, is an error naming the key.
# First the config helpers:

# %%
#| export
class ConversionError(ValueError):
    """A checkpoint or config looplm cannot load exactly; the message names the key or field."""


_KINDS = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          bool: lambda v: isinstance(v, bool)}


def _field(config, name, kind, default=None, required=False):
    """config[name], checked to be of `kind`; `default` when absent or null (unless required)."""
    if config.get(name) is None:
        if required:
            raise ConversionError(f"config.json has no field {name!r}, which this architecture needs")
        return default
    if not _KINDS[kind](config[name]):
        raise ConversionError(f"config field {name!r} must be a{'n' if kind is int else ''} {kind.__name__}, "
                              f"got {config[name]!r}")
    return config[name]


def _refuse(name, value, why):
    raise ConversionError(f"config field {name!r} = {value!r} cannot be expressed in looplm: {why}. Refusing to "
                          f"build a model that computes something else")


def _expect(config, name, supported, default):
    """The field's value when it is the one looplm supports, else a ConversionError naming it."""
    value = config.get(name, default)
    if value != supported or type(value) is not type(supported):
        _refuse(name, value, f"the published model uses {supported!r}, and so does the converter")
    return value


def _with_overrides(fields, overrides):
    """LoopLMConfig(**fields), with `overrides` (LoopLMConfig field names) on top."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(LoopLMConfig)})
    if unknown:
        raise TypeError(f"unknown override(s) {', '.join(unknown)}: overrides are LoopLMConfig fields, "
                        f"e.g. n_loops=8 or max_seq_len=4096")
    return LoopLMConfig(**{**fields, **overrides})

# %% [markdown]
# Ouro's config. The fields and their defaults are those of `OuroConfig`; the loop count
# defaults to `total_ut_steps`, and `looplm`'s exit gate, sandwich norms and feedback norm
# express the rest.

# %%
#| export
def ouro_config(config, **overrides):
    """The LoopLMConfig of an Ouro config.json (a dict); overrides are LoopLMConfig fields."""
    d = _field(config, "hidden_size", int, required=True)
    n_heads = _field(config, "num_attention_heads", int, required=True)
    n_kv = _field(config, "num_key_value_heads", int, n_heads)
    n_layers = _field(config, "num_hidden_layers", int, required=True)
    head_dim = _field(config, "head_dim", int, d // n_heads)
    if head_dim * n_heads != d:
        _refuse("head_dim", head_dim, f"heads must be hidden_size / num_attention_heads = {d // n_heads} wide")
    _expect(config, "hidden_act", "silu", "silu")
    if config.get("rope_scaling") is not None:
        _refuse("rope_scaling", config["rope_scaling"], "rotary scaling is not implemented")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse("partial_rotary_factor", config["partial_rotary_factor"], "rotary on part of each head is not implemented")
    types = config.get("layer_types") or [
        "sliding_attention" if config.get("use_sliding_window") and i >= config.get("max_window_layers", 28)
        else "full_attention" for i in range(n_layers)]
    if any(t != "full_attention" for t in types):
        first = next(i for i, t in enumerate(types) if t != "full_attention")
        _refuse("layer_types", types[first], f"layer {first} would use sliding-window attention, which is not implemented")
    fields = dict(vocab_size=_field(config, "vocab_size", int, required=True), d_model=d, n_heads=n_heads,
                  n_kv_heads=None if n_kv == n_heads else n_kv, n_core=n_layers,
                  n_loops=_field(config, "total_ut_steps", int, 4), exit_gate=True,
                  d_hidden=_field(config, "intermediate_size", int, required=True),
                  max_seq_len=_field(config, "max_position_embeddings", int, 32768), norm_style="sandwich",
                  tie_embeddings=_field(config, "tie_word_embeddings", bool, False),
                  rope_base=float(_field(config, "rope_theta", float, 10000.0)),
                  eps=float(_field(config, "rms_norm_eps", float, 1e-6)), feedback_norm=True)
    return _with_overrides(fields, overrides)


def ouro_exit_rule(config):
    """The exit rule Ouro's code applies by default (labels=None), from its config.json:
    early_exit_step k (0-based) is FixedDepth(k + 1), since looplm counts steps from 1; else
    early_exit_threshold q is QExit(q) (q = 1.0 in the released configs); else None."""
    steps = _field(config, "total_ut_steps", int, 4)
    k = _field(config, "early_exit_step", int)
    if k is not None and 0 <= k < steps:
        return FixedDepth(k + 1)
    q = _field(config, "early_exit_threshold", float)
    return None if q is None else QExit(q)

# %% [markdown]
# Huginn's config. `RavenConfig` keeps its own names (`n_embd`, `n_layers_in_prelude`, …, with
# `num_attention_heads` and `hidden_size` as aliases) and names its building blocks; anything
# but the ones Huginn-0125 uses is refused. The embedding scale is $\sqrt{d}$, as its code
# computes it; the config's `init_values` carries the same number as `embed_scale` and must
# agree, and its `std` sets the random start.

# %%
#| export
def huginn_config(config, **overrides):
    """The LoopLMConfig of a Huginn (RavenConfig) config.json; overrides are LoopLMConfig fields."""
    d = _field(config, "n_embd", int) or _field(config, "hidden_size", int, required=True)
    heads = {name: _field(config, name, int) for name in ("n_heads", "num_attention_heads")}
    if None not in heads.values() and heads["n_heads"] != heads["num_attention_heads"]:
        _refuse("num_attention_heads", heads["num_attention_heads"], f"it disagrees with n_heads={heads['n_heads']}, "
                                                                      f"its alias")
    n_heads = heads["n_heads"] or heads["num_attention_heads"]
    if n_heads is None:
        raise ConversionError("config.json has no field 'n_heads' (or 'num_attention_heads')")
    if _field(config, "num_key_value_heads", int, n_heads) != n_heads:
        _refuse("num_key_value_heads", config["num_key_value_heads"], "Huginn's code supports only as many as n_heads")
    if _field(config, "head_dim", int, d // n_heads) * n_heads != d:
        _refuse("head_dim", config["head_dim"], f"heads must be n_embd / n_heads = {d // n_heads} wide")
    for name, supported in (("block_class_name", "SandwichBlock"), ("norm_class_name", "RMSNorm_llama"),
                            ("mlp_class_name", "GatedMLP"), ("nonlin_name", "SiLU"), ("injection_type", "linear"),
                            ("state_init", "like-init"), ("bias", False)):
        _expect(config, name, supported, supported)
    if config.get("test_time_noise", 0) != 0:
        _refuse("test_time_noise", config["test_time_noise"], "noise added to the state at every step is not implemented")
    parts = [_field(config, name, int, required=True)
             for name in ("n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda")]
    if _field(config, "n_layers", int, sum(parts)) != sum(parts):
        _refuse("n_layers", config["n_layers"], f"it must be prelude + core + coda = {sum(parts)}")
    init = config.get("init_values") or {}
    scale = math.sqrt(d)
    if not math.isclose(init.get("embed_scale", scale), scale, rel_tol=1e-5):
        _refuse("init_values.embed_scale", init["embed_scale"], f"Huginn's code scales by sqrt(n_embd) = {scale:.6g} "
                                                                 f"whatever the config says, and the two disagree")
    vocab = _field(config, "padded_vocab_size", int) or _field(config, "vocab_size", int, required=True)
    fields = dict(vocab_size=vocab, d_model=d, n_heads=n_heads, n_prelude=parts[0], n_core=parts[1],
                  n_coda=parts[2], n_loops=_field(config, "mean_recurrence", int, 32), injection="concat",
                  init_state="random", d_hidden=_field(config, "intermediate_size", int, required=True),
                  max_seq_len=_field(config, "block_size", int, 4096), norm_style="huginn",
                  tie_embeddings=_field(config, "tie_embeddings", bool, True),
                  rope_base=float(_field(config, "rope_base", float, 50000.0)),
                  eps=float(_field(config, "norm_eps", float, 1e-6)), qk_bias=_field(config, "qk_bias", bool, True),
                  embed_scale=scale, norm_before_coda=True,
                  init_state_std=init.get("std", math.sqrt(2 / (5 * d))) * scale)
    return _with_overrides(fields, overrides)

# %% [markdown]
# The tensors. `_checked` compares the keys and shapes a checkpoint must have with what it
# holds, and names the first problem; an optional key (a head tied to the embedding, a rotary
# buffer) may be missing. Ouro's mapping is a rename, with $q$, $k$, $v$ stacked into one
# matrix. Huginn's splits its MLP's `fc` into gate and up halves, reorders the $q$ and $k$ rows
# and the bias by section 8.3's permutation, and checks what it drops: a stored tied head must
# equal the embedding, and a stored rotary buffer must hold the tables for `rope_base`.

# %%
#| export
def _checked(state_dict, expected, optional=()):
    """Raise ConversionError naming a missing, unexpected or wrongly shaped tensor."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    for key, shape in expected.items():
        if key not in state_dict:
            if key in optional:
                continue
            raise ConversionError(f"the checkpoint has no tensor {key!r}, which this config needs")
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(shape):
            got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ConversionError(f"tensor {key!r} has shape {got}; this config needs {list(shape)}")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ConversionError(f"the checkpoint holds a tensor this config does not explain: {unexpected[0]!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))


def _ouro_keys(c):
    d, hd, kv, inner = c.d_model, c.head_dim, c.kv_heads * c.head_dim, c.d_hidden
    keys = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,),
            "model.early_exit_gate.weight": (1, d), "model.early_exit_gate.bias": (1,),
            "lm_head.weight": (c.vocab_size, d), "model.rotary_emb.inv_freq": (hd // 2,)}
    for l in range(c.n_core):
        p = f"model.layers.{l}."
        keys.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                     p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                     p + "mlp.gate_proj.weight": (inner, d), p + "mlp.up_proj.weight": (inner, d),
                     p + "mlp.down_proj.weight": (d, inner)})
        keys.update({p + f"{n}.weight": (d,) for n in _OURO_NORMS})
    return keys


_OURO_NORMS = ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2")


def ouro_state_dict(state_dict, config):
    """Ouro's tensors (published names) -> a LoopLM state dict for ouro_config(config)."""
    c = config if isinstance(config, LoopLMConfig) else ouro_config(config)
    optional = {"model.rotary_emb.inv_freq"} | ({"lm_head.weight"} if c.tie_embeddings else set())
    _checked(state_dict, _ouro_keys(c), optional)
    sd = state_dict
    if c.tie_embeddings and "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
        raise ConversionError("tensor 'lm_head.weight' differs from 'model.embed_tokens.weight', but the config "
                              "ties them (tie_word_embeddings): which one the model should use is ambiguous")
    if "model.rotary_emb.inv_freq" in sd:              # a non-persistent buffer, saved by some exporters
        expected = c.rope_base ** (-torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
        if not torch.allclose(sd["model.rotary_emb.inv_freq"].double(), expected, rtol=1e-3):
            raise ConversionError(f"tensor 'model.rotary_emb.inv_freq' does not match rope_theta={c.rope_base:g}")
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "exit_gate.proj.weight": sd["model.early_exit_gate.weight"],
           "exit_gate.proj.bias": sd["model.early_exit_gate.bias"],
           "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for l in range(c.n_core):
        p, q = f"model.layers.{l}.", f"core.{l}."
        out[q + "attn.qkv.weight"] = torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[q + "attn.proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out.update({q + f"mlp.{x}.weight": sd[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up", "down")})
        out.update({q + f"norms.{i}.weight": sd[p + f"{n}.weight"] for i, n in enumerate(_OURO_NORMS)})
    return out


_HUGINN_GROUPS = (("prelude", "prelude", "n_prelude"), ("core_block", "core", "n_core"), ("coda", "coda", "n_coda"))


def _huginn_keys(c):
    d, inner = c.d_model, c.d_hidden
    keys = {"transformer.wte.weight": (c.vocab_size, d), "transformer.adapter.weight": (d, 2 * d),
            "transformer.ln_f.weight": (d,), "lm_head.weight": (c.vocab_size, d),
            "freqs_cis": (1, c.max_seq_len, 1, c.head_dim // 2, 2)}
    for group, _, count in _HUGINN_GROUPS:
        for i in range(getattr(c, count)):
            p = f"transformer.{group}.{i}."
            keys.update({p + f"norm_{k}.weight": (d,) for k in range(1, 5)})
            keys.update({p + "attn.Wqkv.weight": (3 * d, d), p + "attn.proj.weight": (d, d),
                         p + "mlp.fc.weight": (2 * inner, d), p + "mlp.proj.weight": (d, inner)})
            if c.qk_bias:
                keys[p + "attn.qk_bias"] = (2, 1, c.n_heads, c.head_dim)
    return keys


def huginn_state_dict(state_dict, config):
    """Huginn's tensors (published names) -> a LoopLM state dict for huginn_config(config)."""
    c = config if isinstance(config, LoopLMConfig) else huginn_config(config)
    optional = {"freqs_cis"} | ({"lm_head.weight"} if c.tie_embeddings else set())
    _checked(state_dict, _huginn_keys(c), optional)
    sd, H, hd = state_dict, c.n_heads, c.head_dim
    if c.tie_embeddings and "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"]):
        raise ConversionError("tensor 'lm_head.weight' differs from 'transformer.wte.weight', but the config ties "
                              "them (tie_embeddings): which one the model should use is ambiguous")
    if "freqs_cis" in sd:                              # a saved buffer: check it, then rebuild our own tables
        cos, sin = rope_angles(hd, c.max_seq_len, c.rope_base, torch.float64)
        stored = sd["freqs_cis"].double()[0, :, 0]
        if not (torch.allclose(stored[..., 0], cos, atol=1e-3) and torch.allclose(stored[..., 1], sin, atol=1e-3)):
            raise ConversionError(f"tensor 'freqs_cis' does not hold the rotary tables of rope_base={c.rope_base:g}")
    out = {"embed.weight": sd["transformer.wte.weight"], "norm.weight": sd["transformer.ln_f.weight"],
           "injection.adapter.weight": sd["transformer.adapter.weight"],
           "lm_head.weight": sd["lm_head.weight"] if not c.tie_embeddings else sd["transformer.wte.weight"]}
    for group, ours, count in _HUGINN_GROUPS:
        for i in range(getattr(c, count)):
            p, q = f"transformer.{group}.{i}.", f"{ours}.{i}."
            w_q, w_k, w_v = sd[p + "attn.Wqkv.weight"].split(c.d_model)
            out[q + "attn.qkv.weight"] = torch.cat([pairs_to_halves(w_q, H, hd), pairs_to_halves(w_k, H, hd), w_v])
            if c.qk_bias:
                bias = sd[p + "attn.qk_bias"][:, 0].reshape(2 * H * hd)          # q's heads, then k's
                out[q + "attn.qk_bias"] = pairs_to_halves(bias, 2 * H, hd).reshape(2, H, hd)
            out[q + "attn.proj.weight"] = sd[p + "attn.proj.weight"]
            out[q + "mlp.gate.weight"], out[q + "mlp.up.weight"] = sd[p + "mlp.fc.weight"].chunk(2)
            out[q + "mlp.down.weight"] = sd[p + "mlp.proj.weight"]
            out.update({q + f"norms.{k}.weight": sd[p + f"norm_{k + 1}.weight"] for k in range(4)})
    return out

# %% [markdown]
# Building the model. A released model has billions of weights, so `_build` makes the `LoopLM`
# on PyTorch's `meta` device (shapes only, no memory and no random initialisation), then
# assigns the converted tensors, rebuilds the rotary tables for real and ties the head again if
# the config says so.

# %%
#| export
def _build(config, state, dtype):
    dtype = dtype or next(iter(state.values())).dtype
    with torch.device("meta"):
        model = LoopLM(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_base).to(dtype)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def from_ouro(state_dict, config, *, dtype=None, **overrides):
    """A LoopLM that computes what Ouro's code computes, per step. state_dict: the tensors under
    Ouro's key names; config: its config.json as a dict; dtype: cast the weights (default: keep
    theirs); overrides: LoopLMConfig fields. The exit rule Ouro applies by default is
    ouro_exit_rule(config); its exit_at_step k is looplm's FixedDepth(k + 1)."""
    c = ouro_config(config, **overrides)
    return _build(c, ouro_state_dict(state_dict, c), dtype)


def from_huginn(state_dict, config, *, dtype=None, **overrides):
    """A LoopLM that computes what Huginn's code computes, per step (given the same initial
    state, state0=); arguments as from_ouro. The loop count defaults to mean_recurrence."""
    c = huginn_config(config, **overrides)
    return _build(c, huginn_state_dict(state_dict, c), dtype)


CONVERTERS = {"ouro": from_ouro, "huginn_raven": from_huginn}
_ARCHITECTURES = {"OuroForCausalLM": "ouro", "RavenForCausalLM": "huginn_raven"}

# %% [markdown]
# And the folder. A released checkpoint is a `config.json` and one or more `.safetensors` files
# (large ones come in shards, `model-00001-of-00002.safetensors`, …); `write_pretrained` writes
# one in the same layout, which the tests and section 8.7 use.

# %%
#| export
def _architecture(config):
    kind = config.get("model_type")
    if kind is None:
        kind = next((_ARCHITECTURES[a] for a in config.get("architectures") or () if a in _ARCHITECTURES), None)
    if kind not in CONVERTERS:
        raise ConversionError(f"config field 'model_type' = {kind!r}: looplm converts {', '.join(sorted(CONVERTERS))}")
    return kind


def load_pretrained(folder, *, dtype=None, **overrides):
    """The LoopLM of a checkpoint folder: config.json and *.safetensors, architecture from the config."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: point load_pretrained at a checkpoint folder")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors file (this reader does not read .bin files)")
    state = {}
    for path in files:
        part = load_file(path)
        twice = sorted(set(part) & set(state))
        if twice:
            raise ConversionError(f"tensor {twice[0]!r} is stored twice (again in {path.name})")
        state.update(part)
    return CONVERTERS[_architecture(config)](state, config, dtype=dtype, **overrides)


def write_pretrained(folder, state_dict, config, shards=1):
    """Write config.json and the tensors as `shards` safetensors files (the published layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    keys = sorted(state_dict)
    for i in range(shards):
        name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state_dict[k].contiguous() for k in keys[i::shards]}, folder / name)
    return folder

# %% [markdown]
# ## 8.7 The check, per step
#
# Now the whole path, as a reader with a downloaded checkpoint would take it: write a random
# checkpoint in each public format, load it with `load_pretrained`, and compare with the
# references. For Ouro, every step's logits, gates and exit probabilities; for Huginn, whose
# code reads out only after its last step, the logits after $s$ steps for $s = 1, \dots, S$
# from one fixed initial state, against the reference run with `num_steps = s`.

# %%
from looplm.convert import load_pretrained, write_pretrained
from looplm.testing import (TINY_HUGINN, TINY_OURO, huginn_reference, ouro_reference, random_huginn_state_dict,
                            random_ouro_state_dict)

folder = Path(tempfile.mkdtemp())
ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
print(f"{'model':7s} {'dtype':8s} {'step':>4s} {'max |Δ logits| / max |logits|':>30s} {'max |Δ gate|':>13s} {'max |Δ p|':>10s}")
for dtype in (torch.float64, torch.float32):
    sd = random_ouro_state_dict(TINY_OURO, dtype=dtype)
    ouro = load_pretrained(write_pretrained(folder / f"ouro-{dtype}", sd, TINY_OURO))
    ref, out = ouro_reference(sd, TINY_OURO, ids), ouro(ids)
    for t in range(3):
        rel = (out.logits[t] - ref["step_logits"][t]).abs().max() / ref["step_logits"][t].abs().max()
        print(f"{'Ouro':7s} {str(dtype)[6:]:8s} {t + 1:4d} {rel:30.1e} {(out.gate[t] - ref['gates'][t]).abs().max():13.1e} "
              f"{(out.exit_probs[t] - ref['pdf'][t]).abs().max():10.1e}")
for dtype in (torch.float64, torch.float32):
    sd = random_huginn_state_dict(TINY_HUGINN, dtype=dtype)
    huginn = load_pretrained(write_pretrained(folder / f"huginn-{dtype}", sd, TINY_HUGINN))
    h0 = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)
    out = huginn(ids, state0=h0)
    for s in range(1, 4):
        ref = huginn_reference(sd, TINY_HUGINN, ids, num_steps=s, state0=h0)
        rel = (out.logits[s - 1] - ref).abs().max() / ref.abs().max()
        print(f"{'Huginn':7s} {str(dtype)[6:]:8s} {s:4d} {rel:30.1e} {'':>13s} {'':>10s}")

# %% [markdown]
# In float64 the converted models agree with the references to rounding, about $10^{-16}$
# relative, and in float32 to a few $10^{-7}$: well inside the tests' limits ($10^{-12}$ absolute
# in float64, $10^{-5}$ relative in float32). The tests below check the same for a config with
# grouped-query attention, a checkpoint in two shards, one without the optional tensors, and the
# bad inputs.

# %% tags=["remove-cell"]
#| test
import json
import math
import tempfile
from pathlib import Path

from looplm.convert import (ConversionError, from_huginn, from_ouro, load_pretrained, ouro_exit_rule,
                            pairs_to_halves, write_pretrained)
from looplm.exits import FixedDepth, QExit, exit_steps
from looplm.testing import (TINY_HUGINN, TINY_OURO, huginn_reference, ouro_reference, random_huginn_state_dict,
                            random_ouro_state_dict)

OURO_GQA = {**TINY_OURO, "num_key_value_heads": 2}


def _ids(B=2, T=10, seed=0):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def _close(got, want, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    else:
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_ouro_per_step_logits_gates_and_exit_probabilities():
    for cfg in (TINY_OURO, OURO_GQA):
        for dtype in (torch.float64, torch.float32):
            sd = random_ouro_state_dict(cfg, seed=3, dtype=dtype)
            model, ids = from_ouro(sd, cfg), _ids()
            out, ref = model(ids, return_hidden=True), ouro_reference(sd, cfg, ids)
            assert model.config.n_loops == cfg["total_ut_steps"] and out.logits.dtype == dtype
            for t in range(cfg["total_ut_steps"]):
                _close(out.logits[t], ref["step_logits"][t], dtype)
                _close(out.hidden[t], ref["hidden"][t], dtype)
            _close(out.gate, ref["gates"], dtype)
            _close(out.exit_probs, ref["pdf"], dtype)
            _close(out.weighted_logits, ref["expected_logits"], dtype)


def test_ouro_threshold_and_fixed_exits_are_ouros():
    sd = random_ouro_state_dict(TINY_OURO, seed=4)
    model, ids = from_ouro(sd, TINY_OURO), _ids(B=3, T=12)
    out = model(ids)
    for q in (0.3, 0.5, 0.9, 1.0):
        ref = ouro_reference(sd, TINY_OURO, ids, exit_threshold=q)
        steps = exit_steps(QExit(q), gate=out.gate)                     # from 1
        assert torch.equal(steps - 1, ref["exit_steps"]), q
        picked = out.logits.gather(0, (steps - 1)[None, ..., None].expand(1, *ids.shape, 64))[0]
        torch.testing.assert_close(picked, ref["logits"], atol=1e-12, rtol=0)
    assert 0 < (ouro_reference(sd, TINY_OURO, ids, exit_threshold=0.5)["exit_steps"] < 2).float().mean() < 1
    for k in range(3):
        torch.testing.assert_close(out.logits[FixedDepth(k + 1).threshold - 1],
                                   ouro_reference(sd, TINY_OURO, ids, exit_at_step=k)["logits"], atol=1e-12, rtol=0)
    assert repr(ouro_exit_rule(TINY_OURO)) == repr(QExit(1.0))
    assert repr(ouro_exit_rule({**TINY_OURO, "early_exit_step": 1})) == repr(FixedDepth(2))
    assert ouro_exit_rule({**TINY_OURO, "early_exit_threshold": None}) is None


def test_huginn_per_step_logits_from_an_explicit_start():
    for dtype in (torch.float64, torch.float32):
        sd = random_huginn_state_dict(TINY_HUGINN, seed=5, dtype=dtype)
        model, ids = from_huginn(sd, TINY_HUGINN), _ids()
        h0 = torch.randn(2, 10, 32, dtype=dtype)
        out = model(ids, state0=h0)
        assert model.config.n_loops == TINY_HUGINN["mean_recurrence"]
        for s in range(1, 4):
            _close(out.logits[s - 1], huginn_reference(sd, TINY_HUGINN, ids, s, h0), dtype)
        more = model(ids, state0=h0, n_loops=5).logits[-1]              # past mean_recurrence too
        _close(more, huginn_reference(sd, TINY_HUGINN, ids, 5, h0), dtype)


def test_huginn_random_start_has_the_published_spread():
    model = from_huginn(random_huginn_state_dict(TINY_HUGINN), TINY_HUGINN)
    h0 = model.init_state(torch.zeros(400, 64, 32, dtype=torch.float64))
    sigma = TINY_HUGINN["init_values"]["std"] * math.sqrt(32)             # sqrt(2/5)
    assert math.isclose(sigma, math.sqrt(2 / 5))
    assert abs(h0.std().item() - sigma * 0.98658) < 0.005 and h0.abs().max() <= 3 * sigma


def test_load_pretrained_equals_direct_conversion():
    tmp_path, ids = Path(tempfile.mkdtemp()), _ids()
    for cfg, sd, convert in ((OURO_GQA, random_ouro_state_dict(OURO_GQA), from_ouro),
                             (TINY_HUGINN, random_huginn_state_dict(TINY_HUGINN), from_huginn)):
        direct = convert(sd, cfg)
        h0 = torch.randn(2, 10, 32, dtype=torch.float64)
        for shards in (1, 2):
            loaded = load_pretrained(write_pretrained(tmp_path / f"{cfg['model_type']}-{shards}", sd, cfg, shards))
            assert loaded.config == direct.config
            assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), direct.state_dict().values()))
            assert torch.equal(loaded(ids, state0=h0).logits, direct(ids, state0=h0).logits)
    bare = random_huginn_state_dict(TINY_HUGINN, lm_head=False, freqs_cis=False)
    full = random_huginn_state_dict(TINY_HUGINN)
    h0 = torch.randn(2, 10, 32, dtype=torch.float64)
    assert torch.equal(from_huginn(bare, TINY_HUGINN)(ids, state0=h0).logits,
                       from_huginn(full, TINY_HUGINN)(ids, state0=h0).logits)
    tied = {**TINY_OURO, "tie_word_embeddings": True}
    model = from_ouro(random_ouro_state_dict(tied), tied)
    assert model.lm_head.weight is model.embed.weight


def test_overrides_and_dtype():
    sd = random_ouro_state_dict(TINY_OURO)
    model = from_ouro(sd, TINY_OURO, n_loops=5, max_seq_len=32, dtype=torch.float32)
    assert model.config.n_loops == 5 and model.config.max_seq_len == 32
    assert all(p.dtype == torch.float32 for p in model.parameters()) and model.rope.cos.dtype == torch.float32
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    with pytest.raises(TypeError, match="n_loop"):
        from_ouro(sd, TINY_OURO, n_loop=5)
    huginn = from_huginn(random_huginn_state_dict(TINY_HUGINN), TINY_HUGINN, init_state="zeros")
    assert huginn.config.init_state == "zeros"


def test_pairs_to_halves_is_a_per_head_permutation():
    rows = torch.arange(2 * 8 * 3).reshape(16, 3)
    got = pairs_to_halves(rows, 2, 8)
    assert got[:, 0].tolist() == [3 * r for r in (0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)]
    assert pairs_to_halves(torch.arange(16), 2, 8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]


def _raises(match, convert, sd, cfg):
    with pytest.raises(ConversionError, match=match):
        convert(sd, cfg)


def test_bad_checkpoints_name_the_key():
    sd = random_ouro_state_dict(TINY_OURO)
    _raises("'model.norm.weight'", from_ouro, {k: v for k, v in sd.items() if k != "model.norm.weight"}, TINY_OURO)
    _raises("'lm_head.weight'", from_ouro, {k: v for k, v in sd.items() if k != "lm_head.weight"}, TINY_OURO)
    _raises(r"'model.layers.0.self_attn.q_proj.bias'", from_ouro,
            {**sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, TINY_OURO)
    _raises(r"'model.layers.1.mlp.up_proj.weight' has shape \[47, 32\]", from_ouro,
            {**sd, "model.layers.1.mlp.up_proj.weight": torch.zeros(47, 32)}, TINY_OURO)
    hg = random_huginn_state_dict(TINY_HUGINN)
    _raises("'lm_head.weight' differs", from_huginn, {**hg, "lm_head.weight": hg["lm_head.weight"] + 1}, TINY_HUGINN)
    _raises("'freqs_cis'", from_huginn, {**hg, "freqs_cis": hg["freqs_cis"].flip(1)}, TINY_HUGINN)
    _raises("'transformer.coda.0.attn.qk_bias'", from_huginn,
            {k: v for k, v in hg.items() if k != "transformer.coda.0.attn.qk_bias"}, TINY_HUGINN)


def test_configs_looplm_cannot_express_name_the_field():
    sd, hg = random_ouro_state_dict(TINY_OURO), random_huginn_state_dict(TINY_HUGINN)
    for field, value in (("hidden_act", "gelu"), ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                         ("layer_types", ["full_attention", "sliding_attention"]), ("head_dim", 16)):
        _raises(f"'{field}'", from_ouro, sd, {**TINY_OURO, field: value})
    _raises("'layer_types'", from_ouro, sd, {**TINY_OURO, "use_sliding_window": True, "max_window_layers": 1})
    _raises("'hidden_size'", from_ouro, sd, {k: v for k, v in TINY_OURO.items() if k != "hidden_size"})
    _raises("'num_hidden_layers' must be an int", from_ouro, sd, {**TINY_OURO, "num_hidden_layers": "2"})
    for field, value in (("injection_type", "additive"), ("state_init", "zero"), ("bias", True),
                         ("test_time_noise", 0.1), ("n_layers", 5), ("num_key_value_heads", 2),
                         ("nonlin_name", "GELU"), ("num_attention_heads", 8)):
        _raises(f"'{field}'", from_huginn, hg, {**TINY_HUGINN, field: value})
    bad_scale = {**TINY_HUGINN, "init_values": {**TINY_HUGINN["init_values"], "embed_scale": 1.0}}
    _raises("'init_values.embed_scale'", from_huginn, hg, bad_scale)


def test_load_pretrained_bad_folders():
    tmp_path = Path(tempfile.mkdtemp())
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY_OURO))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_pretrained(tmp_path)
    write_pretrained(tmp_path / "x", random_ouro_state_dict(TINY_OURO), {**TINY_OURO, "model_type": "llama"})
    with pytest.raises(ConversionError, match="'model_type' = 'llama'"):
        load_pretrained(tmp_path / "x")


run_tests(test_ouro_per_step_logits_gates_and_exit_probabilities, test_ouro_threshold_and_fixed_exits_are_ouros,
          test_huginn_per_step_logits_from_an_explicit_start, test_huginn_random_start_has_the_published_spread,
          test_load_pretrained_equals_direct_conversion, test_overrides_and_dtype,
          test_pairs_to_halves_is_a_per_head_permutation, test_bad_checkpoints_name_the_key,
          test_configs_looplm_cannot_express_name_the_field,
          test_load_pretrained_bad_folders)

# %% [markdown]
# What the feedback switch of section 8.4 does to a real configuration: the converted tiny Ouro
# with and without `feedback_norm`, the same weights.

# %% tags=["nbval-check-output"]
sd = random_ouro_state_dict(TINY_OURO)
normed, raw = from_ouro(sd, TINY_OURO), from_ouro(sd, TINY_OURO, feedback_norm=False)
a, b = normed(ids).logits, raw(ids).logits
print("max |logits difference| per step, Ouro's feedback against looplm's default:",
      [f"{(a[t] - b[t]).abs().max().item():.2f}" for t in range(3)])

# %% [markdown]
# Step 1 agrees exactly, as the formulas say; from step 2 on the two loops compute different
# functions, by about a fifth of a logit here, with small random weights. Loading Ouro with
# `looplm`'s default loop would give a model that agrees on step 1 and nowhere else.
#
# ## 8.8 The knobs users ask for
#
# People running the released Ouro models ask for the same few controls
# {cite:p}`mlx-lm-issue599`. Each is a `generate` argument:
#
# | Ouro's code | `looplm` |
# |---|---|
# | `exit_threshold=q` (default: `early_exit_threshold`, 1.0 in the released configs) | `exit_rule=QExit(q)`, or `ouro_exit_rule(config)` |
# | `exit_at_step=k`, counted from 0 | `exit_rule=FixedDepth(k + 1)`: this book counts steps from 1 |
# | `use_weighted_exit=True`: logits averaged with $p(t \mid x)$ | `weighted_exit=True`, and `out.weighted_logits` in `forward` |
# | every step runs; the exit picks which readout reaches the head | `exit_mode="select"` |
#
# The last row is the real difference. Chapter 7's decoder skips the steps after a token's exit
# and fills their cache entries with copies of the exit step's (`exit_mode="skip"`, the
# default). Ouro's exit is *logical*: every step runs and writes its own cache entries, and the
# threshold only chooses which step's output reaches the LM head. So a later token reading the
# cache sees different keys under the two modes, and only `"select"` agrees exactly with the
# released code; `"skip"` is faster. With `q = 1.0` the two coincide: in exact arithmetic the
# CDF reaches 1 only at the last step, so Ouro's default is full depth. (In bfloat16 a gate that
# rounds to 1 makes the CDF reach 1 early; Exercise 8.3 asks when.)
#
# The reference decoder for `"select"` recomputes everything: for each new token, run the
# reference forward on the whole sequence with Ouro's threshold and take the last position's
# choice. `generate` with the cache must produce the same tokens and logits.

# %% tags=["remove-cell"]
#| test
def reference_select_decode(sd, cfg, prompt, n_new, q=None, weighted=False):
    """Greedy decoding with Ouro's own readout at every position, recomputed from scratch."""
    seq, logits = torch.tensor([prompt]), []
    for _ in range(n_new):
        ref = ouro_reference(sd, cfg, seq, exit_threshold=q)
        last = (ref["expected_logits"] if weighted else ref["logits"] if q is not None else ref["step_logits"][-1])[0, -1]
        logits.append(last)
        seq = torch.cat([seq, last.argmax().view(1, 1)], 1)
    return seq[0, len(prompt):], torch.stack(logits)


def test_select_decoding_is_ouros_and_skip_differs():
    for cfg in (TINY_OURO, OURO_GQA):
        sd = random_ouro_state_dict(cfg, seed=6)
        model, prompt = from_ouro(sd, cfg), [3, 14, 15, 9, 26, 5]
        for q in (0.3, 0.5, 1.0):
            res = generate(model, [prompt], 8, exit_rule=QExit(q), exit_mode="select")
            tokens, logits = reference_select_decode(sd, cfg, prompt, 8, q)
            assert torch.equal(res.new_tokens[0], tokens), (cfg, q)
            torch.testing.assert_close(res.logits[0], logits, atol=1e-10, rtol=0)
        res = generate(model, [prompt], 8)                                       # no rule: full depth
        tokens, logits = reference_select_decode(sd, cfg, prompt, 8)
        assert torch.equal(res.new_tokens[0], tokens)
        torch.testing.assert_close(res.logits[0], logits, atol=1e-10, rtol=0)
        res = generate(model, [prompt], 8, weighted_exit=True)
        tokens, logits = reference_select_decode(sd, cfg, prompt, 8, weighted=True)
        assert torch.equal(res.new_tokens[0], tokens)
        torch.testing.assert_close(res.logits[0], logits, atol=1e-10, rtol=0)
    # The modes differ only where a token reads an entry that "skip" filled: a position whose token
    # exited at step e holds copies beyond e, which a later token reads if it runs deeper than e.
    differed = 0
    for seed in (6, 7):
        model = from_ouro(random_ouro_state_dict(TINY_OURO, seed=seed), TINY_OURO)
        for q in (0.3, 0.5, 0.7, 0.9):
            select = generate(model, [[3, 14, 15, 9, 26, 5]], 12, exit_rule=QExit(q), exit_mode="select")
            skip = generate(model, [[3, 14, 15, 9, 26, 5]], 12, exit_rule=QExit(q), exit_mode="skip")
            assert torch.equal(select.logits[0, 0], skip.logits[0, 0])         # the prefill: the same
            steps = select.steps[0, 1:]                                         # decided at fed-back positions
            deeper_later = bool((steps[1:] > steps[:-1].cummin(0).values).any())
            same = torch.equal(select.logits, skip.logits)
            if not deeper_later:
                assert same, (seed, q)
            differed += not same
    assert differed


def test_select_mode_in_a_batch_and_with_huginn():
    model = from_ouro(random_ouro_state_dict(TINY_OURO, seed=7), TINY_OURO)
    prompts = [[3, 14, 15], [9, 26, 5, 35, 8]]
    batch = generate(model, prompts, 6, exit_rule=QExit(0.5), exit_mode="select")
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], 6, exit_rule=QExit(0.5), exit_mode="select")
        assert torch.equal(batch.new_tokens[row], alone.new_tokens[0])
        torch.testing.assert_close(batch.logits[row], alone.logits[0], atol=1e-10, rtol=0)
    huginn = from_huginn(random_huginn_state_dict(TINY_HUGINN), TINY_HUGINN, init_state="zeros")
    res = generate(huginn, [[3, 14, 15, 9]], 6)
    tokens, logits = recompute_greedy(huginn, [3, 14, 15, 9], 6)
    assert torch.equal(res.new_tokens[0], tokens)
    torch.testing.assert_close(res.logits[0], logits, atol=1e-10, rtol=0)


def test_exit_options_refuse_what_they_cannot_do():
    ouro = from_ouro(random_ouro_state_dict(TINY_OURO), TINY_OURO)
    with pytest.raises(ValueError, match="exit_mode"):
        generate(ouro, [[1, 2]], 2, exit_mode="logical")
    with pytest.raises(ValueError, match="weighted_exit"):
        generate(ouro, [[1, 2]], 2, exit_rule=QExit(0.5), weighted_exit=True)
    huginn = from_huginn(random_huginn_state_dict(TINY_HUGINN), TINY_HUGINN)
    with pytest.raises(ValueError, match="exit gate"):
        generate(huginn, [[1, 2]], 2, weighted_exit=True)


run_tests(test_select_decoding_is_ouros_and_skip_differs, test_select_mode_in_a_batch_and_with_huginn,
          test_exit_options_refuse_what_they_cannot_do)

# %% [markdown]
# A tiny random Ouro where the modes part, with $q = 0.7$:

# %% tags=["nbval-check-output"]
tiny = from_ouro(random_ouro_state_dict(TINY_OURO, seed=7), TINY_OURO)
runs = {mode: generate(tiny, [[3, 14, 15, 9, 26, 5]], 12, exit_rule=QExit(0.7), exit_mode=mode)
        for mode in ("select", "skip")}
for mode, res in runs.items():
    print(f"{mode:6s}: tokens {res.new_tokens[0].tolist()}\n        readout steps {res.steps[0].tolist()}")
gap = (runs["select"].logits - runs["skip"].logits).abs().amax(-1)[0]
print("max |logits difference| per new token:", [f"{g:.3f}" for g in gap.tolist()])

# %% [markdown]
# The readout steps are the rule's choice in both modes; under `"select"` every token still ran
# all three steps. Each new token is decided at the position of the one before it, and under
# `"skip"` that position's entries past the token's exit step are copies. New tokens 2 and 3
# exited at step 1, so the positions of tokens 1 and 2 hold copies for steps 2 and 3. Token 4
# needs two steps, and at step 2 it reads those copies: its logits differ by 0.034. The tokens
# after it exit at step 1 again and read nothing that was copied. Random weights say nothing
# about quality, so the next section asks a trained model.
#
# ## 8.9 What skipping costs
#
# The model is chapter 7's: the stack task, one block looped four times with an exit gate
# trained by Ouro's two stages, three seeds. Each seed decodes the 300 held-out prompts greedily
# with Q-exit at several thresholds, under both modes, and with the weighted readout. The
# numbers do not depend on the machine, so they are a stored experiment (Appendix B),
# recomputed with `python -m looplm.results run exit-modes`.

# %%
#| export experiments
import torch

from looplm.data import TASK_VOCAB, decode_answer
from looplm.exits import QExit
from looplm.generate import generate
from looplm.results import Experiment, register
from looplm.train import train_two_stage

CH08_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def exit_mode_quality(model, examples, thresholds=CH08_THRESHOLDS, batch_size=100, vocab=TASK_VOCAB):
    """Greedy decoding of `examples` at full depth, with the weighted readout, and with Q-exit at
    each threshold in both exit modes. -> rows: setting, accuracy, readout (mean readout step of
    the new tokens), answers (the decoded answers); the "skip" rows also have deeper (the share of
    rows where a token runs deeper than an earlier decoded one, the only way the modes can differ)
    and differs (the share of rows whose readout logits differ from "select"'s by more than 1e-4)."""
    model.eval()
    prompts = [vocab.encode(e.prompt) for e in examples]
    max_new = max(len(e.answer) for e in examples) + 1
    settings = [("full depth", None, "skip", False), ("weighted", None, "select", True)]
    settings += [(f"q={q} {mode}", q, mode, False) for q in thresholds for mode in ("select", "skip")]
    rows, selected = [], []
    for name, q, mode, weighted in settings:
        answers, steps, deeper, logits = [], [], [], []
        for start in range(0, len(prompts), batch_size):
            res = generate(model, prompts[start:start + batch_size], max_new, stop_tokens=[vocab.eos_id],
                           exit_rule=None if q is None else QExit(q), exit_mode=mode, weighted_exit=weighted)
            answers += [decode_answer(row, vocab) for row in res.new_tokens]
            steps.append(res.steps[res.steps > 0])
            later = res.steps[:, 1:]                          # decided at fed-back positions
            deeper.append(((later[:, 1:] > later[:, :-1].cummin(1).values) & (later[:, 1:] > 0)).any(1))
            logits.append(res.logits)
        row = {"setting": name, "answers": answers, "readout": torch.cat(steps).float().mean().item(),
               "accuracy": sum(a == e.answer for a, e in zip(answers, examples)) / len(examples)}
        if mode == "select":
            selected = logits
        elif q is not None:
            gap = torch.cat([(a - b).abs().amax((1, 2)) for a, b in zip(logits, selected)])
            row.update(deeper=torch.cat(deeper).float().mean().item(), differs=(gap > 1e-4).float().mean().item())
        rows.append(row)
    return rows


def _ch08_run(seed):
    model, splits, batches, config = _ch07_setup(seed)
    trainer = train_two_stage(model, batches, config, stage2_steps=200)
    return {"rows": exit_mode_quality(model, splits.test), "prefix": [row["loss"] for row in trainer.history[:20]]}


EXIT_MODES_EXPERIMENT = register(Experiment(
    "exit-modes", "08", "chapter 8: accuracy of Q-exit decoding when exited tokens skip or still run the deeper steps",
    _ch08_run, _ch07_prefix))

# %% tags=["nbval-check-output"]
from looplm.results import load_results, per_seed, summary

stored = load_results("exit-modes")
print(stored["command"], "| seeds", stored["seeds"])
runs = per_seed(stored, "rows")
print(f"{'setting':13s} {'accuracy':>14s} {'readout step':>12s} {'same answers':>14s} {'deeper rows':>14s} "
      f"{'rows differ':>14s}")
for i, row in enumerate(runs[0]):
    rows, extra = [run[i] for run in runs], ""
    if row["setting"].endswith("skip"):                       # against the select row before it
        same = [sum(a == b for a, b in zip(run[i]["answers"], run[i - 1]["answers"])) / len(row["answers"])
                for run in runs]
        extra = "".join(f" {summary(v):14.3f}" for v in (same, [r["deeper"] for r in rows], [r["differs"] for r in rows]))
    print(f"{row['setting']:13s} {summary([r['accuracy'] for r in rows]):14.3f} "
          f"{summary([r['readout'] for r in rows]):12.2f}{extra}")

# %% [markdown]
# Mean ± half-range over the seeds; "same answers" is the share of prompts where skip decoded
# the same answer as select, "deeper rows" the share of rows where a generated token ran deeper
# than an earlier one, and "rows differ" the share whose readout logits differ from select's by
# more than $10^{-4}$.
#
# Skipping cost nothing here. At every threshold the two modes decoded the same answer for all
# 300 prompts in every seed, so their accuracies are equal. The reason is when the modes can
# differ at all: under `"skip"`, a position's entries beyond its token's exit step are copies,
# and only a later token that runs *deeper* than that exit reads them. Such rows are rare on
# this task: 2.0% of them on average at $q = 0.3$ (0.3% to 5.3% by seed), 0.1% at $q = 0.5$,
# none above; their logits differ, but never by enough to change a token. Answers here are a
# few tokens long, which makes this an easy case; a model that writes long text, with token
# depths that rise and fall, is where `"skip"` can cost something, and where its savings are
# largest.
#
# Two more readings of the table. Q-exit at $q = 0.7$ kept full-depth accuracy in every seed
# (0.884) with about 3.5 steps per token. And the weighted readout, which averages the steps'
# predictions instead of picking one, lost accuracy in every seed (0.850 against 0.884): the
# early steps' wrong predictions keep their weight.

# %% [markdown]
# ## 8.10 Loading the released checkpoints
#
# With network access, the released checkpoints are a download away; the loading code is the
# code this chapter tested. For Ouro-1.4B (about 2.9 GB in bfloat16) and Huginn-0125:
#
# ```bash
# pip install huggingface_hub
# huggingface-cli download ByteDance/Ouro-1.4B --local-dir ouro-1.4b
# huggingface-cli download tomg-group-umd/huginn-0125 --local-dir huginn-0125
# ```
#
# ```python
# import json
#
# import torch
# from looplm.convert import load_pretrained, ouro_exit_rule
# from looplm.generate import generate
# from looplm.exits import QExit
#
# ouro = load_pretrained("ouro-1.4b", dtype=torch.bfloat16, max_seq_len=4096)   # 96 cache slots per token
# huginn = load_pretrained("huginn-0125", dtype=torch.bfloat16, n_loops=32)
# # token ids from each model's own tokenizer, e.g. transformers.AutoTokenizer.from_pretrained("ouro-1.4b")
# rule = ouro_exit_rule(json.load(open("ouro-1.4b/config.json")))                 # QExit(1.0) as released
# res = generate(ouro, [ids], 64, exit_rule=rule, exit_mode="select")              # Ouro's default decoding
# res = generate(ouro, [ids], 64, exit_rule=QExit(0.5))                            # early exit that skips work
# ```
#
# Three practical notes. The memory check `LoopLM` runs assumes float32 weights: Ouro-2.6B
# needs about 10.7 GB to build that way, half of it in bfloat16. `max_seq_len=4096` keeps the
# rotary tables small (Ouro's config allows 65,536 positions). And neither published code
# shifts positions for left-padded batches, while `generate` does, so batched prompts of
# different lengths agree with them only row by row.

# %% [markdown]
# ## 8.11 Where `looplm` chooses differently
#
# - **The state fed back.** `looplm`'s default loop feeds the raw state and norms only for the
#   readout; Ouro feeds the normed state. Chapter 3's experiments used the default; whether
#   Ouro's choice trains better at this scale is a question this book has not measured. A
#   normed feedback keeps the state's scale fixed from step to step, which is one way to keep a
#   deep loop stable; the raw residual stream can grow with the steps (chapter 3 measured it).
# - **Exits that skip work.** Chapter 7's default `"skip"` mode makes an exit save compute;
#   Ouro's exits save nothing at decode time. Section 8.9 measures the price.
# - **A cache of 4 × 24 slots.** Ouro-1.4B's cache has 96 slots per token, 768 KiB in
#   bfloat16, because it loops a full-width stack with 16 key/value heads. Chapter 7's
#   shared-cache strategies, or grouped-query attention in a model trained with it, are the
#   two ways to shrink it.
# - **Numerics.** Both public codes compute norms and rotary tables in float32 and cast back;
#   `looplm` computes in float32 *or wider*, so a float64 model stays float64. In bfloat16 the
#   last bits differ: upstream multiplies the norm's gain after casting back and takes the gate's
#   sigmoid in bfloat16, `looplm` multiplies before and takes it in float32.
# - **Huginn's exits.** Huginn decides with a KL test between successive steps; its code compares
#   $\mathrm{KL}(p_{t-1} \,\|\, p_t)$ with $10^{-3}$, while chapter 5's `KLExit` uses
#   $\mathrm{KL}(p_t \,\|\, p_{t-1})$. Its default cache drops an exited token's deeper entries
#   instead of filling them; chapter 7's fill rule corresponds to its `latest-m4` option.

# %% [markdown]
# ## 8.12 Bad input gets a clear error
#
# The tests of section 8.7 cover each case; here is what a reader sees for three of them:

# %% tags=["nbval-check-output"]
from looplm.convert import ConversionError, from_huginn, from_ouro

bad = {"missing key": (from_ouro, {k: v for k, v in random_ouro_state_dict(TINY_OURO).items()
                                   if k != "model.norm.weight"}, TINY_OURO),
       "another activation": (from_ouro, random_ouro_state_dict(TINY_OURO), {**TINY_OURO, "hidden_act": "gelu"}),
       "an adapter bias": (from_huginn, random_huginn_state_dict(TINY_HUGINN), {**TINY_HUGINN, "bias": True})}
for case, (convert, sd, cfg) in bad.items():
    try:
        convert(sd, cfg)
    except ConversionError as e:
        print(f"{case}: {e}")

# %% [markdown]
# ## Summary
#
# `looplm.convert` (new):
#
# | name | what it does |
# |---|---|
# | `from_ouro(state_dict, config, *, dtype=None, **overrides)` | Ouro's tensors and config.json -> a `LoopLM` computing what its code computes, per step; `n_loops` defaults to `total_ut_steps` |
# | `from_huginn(state_dict, config, *, dtype=None, **overrides)` | the same for Huginn (given the same start, `state0=`); `n_loops` defaults to `mean_recurrence` |
# | `load_pretrained(folder, *, dtype=None, **overrides)` | `config.json` + `*.safetensors` (shards too), architecture from `model_type` |
# | `write_pretrained(folder, state_dict, config, shards=1)` | the same layout, written |
# | `ouro_config`, `huginn_config`, `ouro_state_dict`, `huginn_state_dict` | the two halves of each conversion |
# | `ouro_exit_rule(config)` | Ouro's default exit as a rule: `QExit(early_exit_threshold)`, or `FixedDepth(early_exit_step + 1)` |
# | `pairs_to_halves(rows, n_heads, head_dim)` | interleaved rotary rows -> rotate-half rows, per head |
# | `ConversionError` | a key or field `looplm` cannot load exactly, named |
#
# New model options: `LoopLMConfig(n_kv_heads=…, qk_bias=…, embed_scale=…, feedback_norm=…,
# norm_before_coda=…, init_state_std=…)`; `GroupedQueryAttention` and `repeat_kv` in
# `looplm.block`; `out.weighted_logits`; `generate(…, exit_mode="skip" | "select",
# weighted_exit=…)`. `looplm.testing` gains the references `ouro_reference` and
# `huginn_reference` and random checkpoints in both formats.
#
# What we showed: with random weights, the converted models agree with independent references
# to $10^{-16}$ relative in float64 and a few $10^{-7}$ in float32, per step, for logits, gates
# and exit probabilities; Ouro's threshold and fixed-step exits are its own; cached decoding in
# `"select"` mode equals Ouro's readout recomputed from scratch; grouped-query attention with all
# heads is chapter 1's attention, and its cache is $n_{kv}/n_h$ of the full one. On chapter 7's
# trained model, letting exited tokens skip the deeper steps decoded the same answers as Ouro's
# select semantics at every threshold in three seeds: the modes can differ only where a later
# token runs deeper than an earlier one, which happened in at most 5.3% of the rows.

# %% [markdown]
# ## Exercises
#
# Each exercise is a module in `exercises/ch08/` with a function for you to write, plus a file
# of graded tests next to it. The reference solutions are in `exercises/solutions/ch08/`. Under
# each exercise are hints, folded away.

# %% [markdown]
# **Exercise 8.1: Ouro's cache, from its config** (`ex1_ouro_cache_bytes.py`). Write
# `ouro_cache_bytes(config, n_tokens, bytes_per_value=2)`: the bytes of keys and values that
# Ouro's code caches for `n_tokens` tokens, from a config.json dict (its layers, steps, key/value
# heads and head size). The tests compare it with the cache `generate` builds for converted
# models.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# One slot per (step, layer); each slot holds a key and a value vector of `num_key_value_heads *
# head_dim` numbers per token. `head_dim` may be missing from the config: then it is
# `hidden_size // num_attention_heads`.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# `2 * total_ut_steps * num_hidden_layers * num_key_value_heads * head_dim * bytes_per_value *
# n_tokens`, with `total_ut_steps` defaulting to 4 and `num_key_value_heads` to
# `num_attention_heads`.
# ```

# %% [markdown]
# **Exercise 8.2: Back to Huginn's layout** (`ex2_halves_to_pairs.py`). Exporting a `looplm` model
# to Huginn's format needs the inverse of `pairs_to_halves`. Write `halves_to_pairs(rows,
# n_heads, head_dim)`, so that `halves_to_pairs(pairs_to_halves(w, H, hs), H, hs)` is `w`, and
# the attention scores of the two layouts agree.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# `pairs_to_halves` sets new row $j$ to old row $\pi(j)$. The inverse puts row $j$ back where it
# came from: `out[..., perm[j]] = rows[..., j]`, or index with the inverse permutation
# `torch.argsort(perm)`.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# Written out, new row $2i$ is old row $i$ and new row $2i + 1$ is old row $i + h_s/2$: stack the
# two halves of each head along a new last dimension and flatten them.
# ```

# %% [markdown]
# **Exercise 8.3: When does Ouro's default exit early?** (`ex3_saturated_gate.py`). With
# `early_exit_threshold = 1.0`, Ouro exits at step $t < S$ only if its CDF there computes to
# 1.0, which needs $1 - \lambda_t$ to round to 0 at some step. Write `saturating_logit(dtype)`:
# the smallest float gate logit $x$ (a Python float) such that `torch.sigmoid(torch.tensor(x,
# dtype=dtype))` is exactly 1.0, for `torch.bfloat16`, `torch.float16` and `torch.float32`. The
# tests check your value and its predecessor in each dtype. Then answer: why is the bfloat16
# value so much smaller than float32's, and what does that mean for a model whose gate logits
# reach 10?

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# $\sigma(x)$ rounds to 1 once $1 - \sigma(x) \approx e^{-x}$ is below half the gap between 1 and
# the largest number below 1 in that dtype, `1 - torch.finfo(dtype).eps / 2`.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# Search: the set of logits that give exactly 1.0 is an interval $[x^*, \infty)$ among the
# representable values of the dtype. Walk through them with `torch.nextafter`, or bisect on
# floats and then step to the first representable value where it holds.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# The logit itself is a number of that dtype: `torch.tensor(x, dtype=dtype)` rounds `x` first.
# Return the smallest value `v` that is representable in the dtype (`float(torch.tensor(v,
# dtype=dtype)) == v`) with `sigmoid == 1.0`; the tests check that the next representable value
# below it gives less than 1.
# ```

# %% [markdown]
# The next cell grades your versions; every test fails until you write the code.

# %%
from looplm.grade import grade

report = grade("ch08")
