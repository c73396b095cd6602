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
# # Chapter 7: Inference with KV caches and per-token early exit
#
# So far every prediction came from a full forward pass over the whole sequence. A language
# model that writes text does not work that way: it reads the prompt once (the **prefill**),
# then adds one token at a time (**decoding**), and at each new token it reuses the keys and
# values that attention computed for the earlier tokens instead of computing them again. That
# store is the **KV cache**. This chapter builds one for a looped model, and then makes the
# exit decisions of chapter 5 save real work while decoding.

# %% [markdown]
# Both are harder for a looped model than for a GPT, and the published systems show it:
#
# - Ouro {cite:p}`zhu2025ouro,ouro-model-card` keeps one cache per (loop step, layer), because the
#   keys a layer produces at step 1 differ from the ones it produces at step 4. Serving stacks
#   that gave it one cache per layer produced garbage after a couple of tokens
#   {cite:p}`sglang-pr32894`; a cache with
#   24 slots where 96 are needed fails with an `IndexError`.
# - Ouro's exit is *logical*: every step runs, and the exit only picks which step's output
#   reaches the LM head. Huginn {cite:p}`geiping2025huginn,huginn-code` exits for real, but in a batch it keeps
#   iterating until every sequence has exited.
#
# We want exits that skip work, per token and per row of a batch, and a cache that stays
# correct when a token skips the deeper steps.

# %% [markdown]
# The plan:
#
# 1. why the loop breaks the naive KV cache, and what the invariant is;
# 2. a block that attends through a cache, with per-row positions for batched prompts;
# 3. the cache: one entry per (step, layer), and four memory-saving strategies for decoding;
# 4. `looplm.generate`: prefill, then token-by-token decoding, greedy or sampled;
# 5. correctness: cached decoding equals recomputing everything, batched equals alone;
# 6. per-token early exit that skips the deeper steps, and how the cache is filled for them;
# 7. checkpoints with loop metadata, and a command line;
# 8. measurements on a trained model: cache bytes, speed, quality, steps per token;
# 9. clear errors for bad input.
#
# The code goes to `looplm/generate/__init__.py` (`looplm.generate` is a package, whose
# `__main__.py` is Appendix C's command line); the benchmark `python -m looplm.bench decode`
# is added to `looplm/bench.py`.

# %% tags=["hide-input"]
import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import looplm
from looplm.exits import make_exit_rule
from looplm.data import TASK_VOCAB, make_splits, make_task
from looplm.model import LoopLM, LoopLMConfig
from looplm.testing import run_tests
from looplm.train import TrainConfig, Trainer, task_accuracy, task_batches, train_two_stage

torch.set_num_threads(1)  # tiny models gain nothing from more threads, and results stay the same
_ = torch.manual_seed(0)  # on machines with different core counts
print("torch", torch.__version__, "| looplm", looplm.__version__)

# %% [markdown]
# The next cell names the module this chapter's `#| export` cells go to; the one after it
# holds the module's imports.

# %%
#| default_exp generate

# %% tags=["hide-input"]
#| export
import argparse
import math
import re
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from looplm.exits import EXIT_RULES, ExitRule, StepView, exit_steps, make_exit_rule
from looplm.data import TASK_VOCAB
from looplm.checks import require_bool, require_int, require_number
from looplm.model import LoopLM, _check_generator, _physical_memory_bytes

# %% [markdown]
# ## 7.1 Why the loop breaks the naive KV cache
#
# In a GPT, layer $l$ computes keys and values $k^{l}_j, v^{l}_j$ for position $j$
# once. When token $j+1$ arrives, its query attends to $k^{l}_{\le j+1}$, and the old ones
# never change: causal attention means position $j$'s computation does not depend on what
# comes after it. So a cache holds one tensor of keys and one of values per layer, and it
# grows by one position per token.
#
# In a looped model the core block runs $S$ times. At step $t$ the block reads the state
# $h^{(t-1)}$, and its keys $k^{(t)}_j = W_k\,\mathrm{norm}(h^{(t-1)}_j)$ depend on $t$. A query
# at step $t$ attends to the keys *of step $t$* of the earlier positions: that is what the
# full forward computes. So the exact cache holds one entry per **(step, layer)**, $S$ times
# the memory of a GPT with the same number of distinct layers, which is Ouro's
# `UniversalTransformerCache` (index `step * n_layers + layer`).
#
# The mistake the serving stacks made is to keep one cache per layer and append to it at
# every step. Then after one token the cache holds $S$ entries for that position instead of
# one, and attention sees each earlier token $S$ times, at the wrong steps. The invariant that
# rules this out follows from what the full forward computes: a query at step $t$ attends to
# one key per earlier position, that position's key of step $t$. As a property of the cache:
#
# > at every step, the cache length equals the number of tokens seen; the loop never
# > inflates it.
#
# We will test it directly.

# %% [markdown]
# What about the prelude and the coda? The prelude runs once per token, before the loop, so
# it needs one cache per prelude block, like a GPT. The coda runs at every readout, that is,
# after every step, on that step's state, so its keys also depend on the step: it needs a
# cache per (step, coda block), like the core. The rule is simple: **one cache entry per
# (block, step) for every block that runs at that step**.

# %% [markdown]
# ## 7.2 A block that attends through a cache
#
# Chapter 1 built two things into the block for this chapter. The first is for batches of
# prompts with different lengths. We left-pad
# them to a common length so that every row writes its next token at the same column. Then
# the position of column $c$ in row $b$ is $c - \text{pad}_b$, different per row, and the
# rotary tables must be gathered per row: `cos`, `sin` of shape $[B, T, h_s/2]$ instead of
# $[T, h_s/2]$. Chapter 1's `apply_rope` accepts exactly that.
#
# The second is the attention op. `Block.forward(x, cos, sin, attend)` hands it to a
# function `attend(q, k, v)` when one is given, and the cache provides that function: it
# stores the new keys and values and attends over the cached ones plus the new ones. The norm
# placements, the MLP and the projections stay chapter 1's code.
#
# A first check: with plain causal attention as `attend` and per-row tables that put every
# row at positions $0..T-1$, the block gives what it gives without them, for every norm style.

# %% tags=["nbval-check-output"]
from looplm.block import Block

for style in ("pre", "sandwich", "huginn"):
    torch.manual_seed(0)
    block = Block(32, 4, norm_style=style)
    x = torch.randn(2, 7, 32)
    cos, sin = looplm.LoopLM(LoopLMConfig(vocab_size=8, d_model=32, n_heads=4)).rope(7)
    causal = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    mine = block(x, cos.expand(2, -1, -1), sin.expand(2, -1, -1), causal)
    print(f"{style:9s} max |per-row tables and attend - Block| = {(mine - block(x, cos, sin)).abs().max().item():.1e}")

# %% [markdown]
# ## 7.3 The cache and its strategies
#
# The exact cache costs $S$ times the memory of a GPT's. Ouro ({cite:t}`zhu2025ouro`, §5.4.2,
# Table 14) and Huginn
# both save some of it by letting steps share cache entries. Ouro also reports where sharing
# works: only **during decoding**. The prompt must be prefilled with every step's keys;
# reusing caches during prefill cost it more than 10 GSM8K points. We follow that finding for
# every strategy, Huginn's included, so our cache has two parts per block:
#
# - the **prompt part**: one copy per step, filled exactly by the prefill;
# - the **decoded part**: the entries of the tokens generated afterwards, stored in a number
#   of *slots* that depends on the strategy.
#
# When the new token at step $t$ attends, it reads the prompt part of step $t$, the slot that
# step $t$ maps to for the earlier decoded tokens, and its own fresh key and value. The
# strategies differ in how many slots there are and what a token writes into them:
#
# | strategy | slots | step $t$ reads | the token writes | from |
# |---|---|---|---|---|
# | `"exact"` | $S$ | slot $t$ | its step-$t$ entry into slot $t$ | Ouro, Huginn |
# | `"last"` | 1 | the slot | every step overwrites it: the last step's entry stays | Ouro |
# | `"first"` | 1 | the slot | its step-1 entry only | Ouro |
# | `"average"` | 1 | the slot | the mean of its entries over the steps it ran | Ouro |
# | `"mod-K"` | $K$ | slot $(t-1) \bmod K$ | its step-$t$ entry into that slot | Huginn (`compress-s16`) |
#
# Ouro reports (Table 14) that the last-step and averaged caches, at a quarter of the
# memory, stay within 0.2 points of the full cache on GSM8K (78.9) and within 2 and 4 points
# on MATH500 (82.4), while the first-step cache collapses (78.9 to 18.7 on GSM8K). Huginn uses a budget of $K$ slots indexed by step mod $K$.
# `"mod-S"` is the exact cache and `"mod-1"` is `"last"`; both identities are tests below.

# %%
#| export
@dataclass(frozen=True)
class CacheStrategy:
    """How the decoded tokens' keys and values are stored; the prompt is always exact.

    kind: "exact", "last", "first", "average" or "mod" (with k slots). Steps count from 1.
    """

    name: str
    kind: str
    k: int | None = None

    def n_slots(self, n_steps):
        """Slots per block for the decoded tokens."""
        if self.kind == "exact":
            return n_steps
        return min(self.k, n_steps) if self.kind == "mod" else 1

    def slot(self, step):
        """The slot step `step` (from 1) reads, and writes to (0-based)."""
        if self.kind == "exact":
            return step - 1
        return (step - 1) % self.k if self.kind == "mod" else 0


CACHE_STRATEGIES = ("exact", "last", "first", "average", "mod-K")


def cache_strategy(name):
    """The CacheStrategy called `name`: 'exact', 'last', 'first', 'average' or 'mod-K' (K >= 1)."""
    if isinstance(name, CacheStrategy):
        return name
    if isinstance(name, str):
        if name in ("exact", "last", "first", "average"):
            return CacheStrategy(name, name)
        match = re.fullmatch(r"mod-([0-9]+)", name)
        if match and int(match.group(1)) >= 1:
            return CacheStrategy(name, "mod", int(match.group(1)))
    raise ValueError(f"unknown cache strategy {name!r}; valid: 'exact', 'last', 'first', 'average', "
                     f"or 'mod-K' with K >= 1 slots (e.g. 'mod-2')")

# %% [markdown]
# Each block gets a `LayerCache`: the prompt part $[C, B, n_h, T_p, h_s]$ with $C = S$ copies
# ($C = 1$ for a prelude block) and the decoded part $[K, B, n_h, N, h_s]$ with $K$ slots and
# room for $N$ decoded tokens, allocated once. The bytes we report are the bytes of these
# tensors, counted exactly.
#
# `LoopKVCache` holds them all, keyed by `(group, index)` with group `"prelude"`, `"core"` or
# `"coda"`, and hands out the `attend` functions. `length` is the number of positions it
# holds: the prompt's columns plus the decoded tokens, the same at every step. With
# `record=True` every decode-time attention call logs how many keys it read and how many
# positions had been seen, for the invariant test.

# %%
#| export
def _attention(q, k, v, mask):
    """scaled_dot_product_attention, where k and v may hold fewer heads than q (grouped-query
    attention, chapter 8: each key/value head serves n_heads // n_kv_heads query heads in a row)."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class LayerCache:
    """Keys and values of one block: prompt part [C, B, nh, Tp, hs], decoded part [K, B, nh, N, hs]
    (nh: the model's key/value heads)."""

    def __init__(self, n_copies, n_slots, batch, n_heads, prompt_len, n_new, head_dim, device, dtype):
        shape = (batch, n_heads)
        self.prompt_k = torch.zeros(n_copies, *shape, prompt_len, head_dim, device=device, dtype=dtype)
        self.prompt_v = torch.zeros_like(self.prompt_k)
        self.new_k = torch.zeros(n_slots, *shape, n_new, head_dim, device=device, dtype=dtype)
        self.new_v = torch.zeros_like(self.new_k)

    def nbytes(self):
        return sum(t.nbytes for t in (self.prompt_k, self.prompt_v, self.new_k, self.new_v))


class LoopKVCache:
    """The KV cache of a LoopLM for one generate() call: a LayerCache per prelude, core and coda block.

    Prompt entries exist per step (exact); decoded entries per slot of `strategy`. prompt_mask
    [B, Tp] is True at real (not padding) prompt columns. n_new: room for decoded tokens.
    """

    def __init__(self, model, strategy, prompt_mask, n_new, n_steps, record=False):
        c = model.config
        self.strategy = cache_strategy(strategy)
        self.n_steps, self.prompt_mask = n_steps, prompt_mask
        self.batch, self.prompt_len = prompt_mask.shape
        self.capacity, self.n_decoded = n_new, 0
        self.all_real = bool(prompt_mask.all())
        param = next(model.parameters())
        slots = self.strategy.n_slots(n_steps)
        dims = (self.batch, c.kv_heads, self.prompt_len, n_new, c.head_dim, param.device, param.dtype)
        self.layers = {}
        for group, count, copies, n_slots in (("prelude", c.n_prelude, 1, 1), ("core", c.n_core, n_steps, slots),
                                              ("coda", c.n_coda, n_steps, slots)):
            for i in range(count):
                self.layers[(group, i)] = LayerCache(copies, n_slots, *dims)
        self.record, self.log = record, []
        T = self.prompt_len
        causal = torch.ones(T, T, dtype=torch.bool, device=prompt_mask.device).tril()
        # a real query sees the real keys up to itself; a padding query sees itself only
        self._prefill_mask = ((causal & prompt_mask[:, None, :])
                              | torch.eye(T, dtype=torch.bool, device=prompt_mask.device))[:, None]

    @property
    def length(self):
        """Positions held: prompt columns + decoded tokens (the same for every step and block)."""
        return self.prompt_len + self.n_decoded

    def nbytes(self):
        return sum(layer.nbytes() for layer in self.layers.values())

    def _where(self, group, step):
        """(prompt copy, decoded slot, strategy kind) of `group` at `step` (from 1)."""
        if group == "prelude":
            return 0, 0, "exact"
        return step - 1, self.strategy.slot(step), self.strategy.kind

    def prefill_attend(self, group, index, step):
        """attend() for the prefill of block (group, index) at `step`: stores the prompt's k, v."""
        layer, (copy, _, _) = self.layers[(group, index)], self._where(group, step)

        def attend(q, k, v):
            layer.prompt_k[copy], layer.prompt_v[copy] = k, v
            return _attention(q, k, v, self._prefill_mask)

        return attend

    def decode_attend(self, group, index, step, rows=None):
        """attend() for the token being decoded (decoded index n_decoded) in `rows` (None: all)."""
        layer, (copy, slot, kind) = self.layers[(group, index)], self._where(group, step)
        n = self.n_decoded

        def attend(q, k, v):                                       # (R, nh, 1, hs) each
            keys = [layer.prompt_k[copy], layer.new_k[slot, :, :, :n]]
            values = [layer.prompt_v[copy], layer.new_v[slot, :, :, :n]]
            mask = None if self.all_real else self.prompt_mask
            if rows is not None:
                keys, values = [t[rows] for t in keys], [t[rows] for t in values]
                mask = None if mask is None else mask[rows]
            keys, values = torch.cat([*keys, k], dim=2), torch.cat([*values, v], dim=2)
            if mask is not None:                                   # (R, 1, 1, Tp + n + 1)
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], n + 1)], dim=1)[:, None, None]
            if self.record:
                self.log.append((group, index, step, keys.shape[2], self.length + 1))
            self._write(layer, kind, slot, step, rows, n, k, v)
            return _attention(q, keys, values, mask)

        return attend

    @staticmethod
    def _write(layer, kind, slot, step, rows, n, k, v):
        if kind == "first" and step > 1:
            return
        at = (slot, slice(None) if rows is None else rows, slice(None), n)
        k, v = k[:, :, 0], v[:, :, 0]                               # (R, nh, hs)
        if kind == "average" and step > 1:                          # running mean over the steps run
            k = (layer.new_k[at] * (step - 1) + k) / step
            v = (layer.new_v[at] * (step - 1) + v) / step
        layer.new_k[at], layer.new_v[at] = k, v

    def fill_deeper(self, rows, exit_step):
        """The deepest-state fill rule, for the token being decoded in `rows` (a LongTensor) that
        exited at `exit_step`: its entry for every deeper step t > exit_step becomes a copy of its
        entry for exit_step, in every core and coda block. Only the per-step strategies ("exact",
        "mod-K") have deeper entries to fill; "last" already holds the exit step's entry, "first"
        and "average" never change after the step they were written at.
        """
        if self.strategy.kind not in ("exact", "mod"):
            return
        n, source = self.n_decoded, self.strategy.slot(exit_step)
        targets = sorted({self.strategy.slot(t) for t in range(exit_step + 1, self.n_steps + 1)} - {source})
        for (group, _), layer in self.layers.items():
            if group == "prelude" or not targets:
                continue
            for target in targets:
                layer.new_k[target, rows, :, n] = layer.new_k[source, rows, :, n]
                layer.new_v[target, rows, :, n] = layer.new_v[source, rows, :, n]

# %% [markdown]
# The memory of each strategy follows from the shapes. For the core of $n_{\text{core}}$ blocks with $S$
# steps, a prompt of $T_p$ tokens and $N$ decoded tokens, in units of one position's keys
# and values in one block:
#
# $$
# \text{exact: } n_{\text{core}}\,S\,(T_p + N), \qquad \text{mod-}K\text{: } n_{\text{core}}\,(S\,T_p + K N), \qquad
# \text{last, first, average: } n_{\text{core}}\,(S\,T_p + N).
# $$
#
# A short demonstration with a made-up model: the bytes per strategy after a 16-token prompt
# and 200 decoded tokens, four steps. The savings grow with the decoded length.

# %% tags=["nbval-check-output"]
demo = LoopLM(LoopLMConfig(vocab_size=32, d_model=64, n_heads=4, n_loops=4, max_seq_len=256))
for name in ("exact", "last", "first", "average", "mod-2", "mod-4"):
    cache = LoopKVCache(demo, name, torch.ones(1, 16, dtype=torch.bool), n_new=200, n_steps=4)
    print(f"{name:8s} {cache.nbytes():>8,d} bytes")

# %% [markdown]
# What does a new token see of the tokens decoded before it? The figure asks the cache itself.
# It decodes one token through `decode_attend` with a model of two core blocks and $S = 4$
# steps, giving it at step $s$ the key and value "step $s$" (a one-hot vector), and then reads
# the slots back. Each panel is one strategy; its rows are the steps $t$ of the next token,
# its columns the core blocks. A cell's colour is the slot that step $t$ reads and writes,
# and its text what that slot holds of the earlier token. Look for the colours that repeat
# down a column: those steps share one slot.

# %% tags=["hide-input"]
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle

CACHE_PANELS = ("exact", "last", "first", "average", "mod-2")
with torch.random.fork_rng():                      # building the model leaves the chapter's seed alone
    cache_probe = LoopLM(LoopLMConfig(vocab_size=8, d_model=16, n_heads=2, n_core=2, n_loops=4))


def cache_after_one_token(strategy, exit_step):
    """Decode one token through the cache, its key and value at step s the one-hot vector of s, up to
    exit_step; then the deepest-state fill. -> (cache, {(step, block): that call wrote}, slots the fill changed)."""
    c = cache_probe.config
    cache = LoopKVCache(cache_probe, strategy, torch.ones(1, 1, dtype=torch.bool), n_new=2, n_steps=c.n_loops)
    query = torch.zeros(1, c.n_heads, 1, c.head_dim)
    wrote = {}
    for step in range(1, exit_step + 1):
        for block in range(c.n_core):
            kv = torch.zeros(1, c.n_heads, 1, c.head_dim)
            kv[..., step - 1] = 1.0                                # this entry "is" step `step`
            before = cache.layers[("core", block)].new_k.clone()
            cache.decode_attend("core", block, step)(query, kv, kv)
            wrote[step, block] = not torch.equal(before, cache.layers[("core", block)].new_k)
    before = cache.layers[("core", 0)].new_k.clone()
    if exit_step < c.n_loops:
        cache.fill_deeper(torch.tensor([0]), exit_step)
    filled = {slot for slot in range(before.shape[0])
              if not torch.equal(before[slot], cache.layers[("core", 0)].new_k[slot])}
    return cache, wrote, filled


def describe_entry(weights):
    """The step(s) a stored entry comes from, read off its weights on the one-hot steps."""
    used = [s + 1 for s, w in enumerate(weights.tolist()) if w > 0]
    return f"step {used[0]}" if len(used) == 1 else f"mean of {used[0]}–{used[-1]}"


def draw_cache_panel(ax, strategy, exit_step):
    """Rows: step t of the next token; columns: core blocks; colour: the slot step t reads."""
    cache, wrote, filled = cache_after_one_token(strategy, exit_step)
    S, n_core = cache.n_steps, cache_probe.config.n_core
    for step in range(1, S + 1):
        slot = cache.strategy.slot(step)
        for block in range(n_core):
            held = cache.layers[("core", block)].new_k[slot, 0, 0, 0, :S]      # the earlier token's entry
            shade = 0.45 if wrote.get((step, block), False) else 0.2
            ax.add_patch(Rectangle((block, step - 1), 1, 1, facecolor=to_rgba(f"C{slot}", shade),
                                   edgecolor="white", linewidth=2, hatch="///" if slot in filled else None))
            ax.text(block + 0.5, step - 0.5, describe_entry(held), ha="center", va="center", fontsize=8)
    ax.set(xlim=(0, n_core), ylim=(S, 0), xticks=[b + 0.5 for b in range(n_core)],
           xticklabels=[f"block {b + 1}" for b in range(n_core)], yticks=[s - 0.5 for s in range(1, S + 1)],
           yticklabels=[f"t = {s}" for s in range(1, S + 1)])
    n_slots = cache.strategy.n_slots(S)
    ax.set_title(f'"{strategy}": {n_slots} slot{"s" if n_slots > 1 else ""}', fontsize=10)
    ax.tick_params(length=0, labelsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)


def draw_cache_strategies(exit_step, title, footnote):
    fig, axes = plt.subplots(1, len(CACHE_PANELS), figsize=(10, 2.9), sharey=True)
    for ax, strategy in zip(axes, CACHE_PANELS):
        draw_cache_panel(ax, strategy, exit_step)
    axes[0].set_ylabel("step of the next token")
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, footnote, ha="center", fontsize=9, color="0.3")
    plt.tight_layout(rect=(0, 0.05, 1, 1))
    plt.show()


draw_cache_strategies(4, "What step t of the next token reads of an earlier decoded token (colour: the slot)",
                      "Dark: step t also writes its own entry there; light: it only reads. "
                      "The prompt's entries are kept for every step in all five.")

# %% [markdown]
# The exact cache gives step $t$ the earlier token's step-$t$ entry. The three one-slot caches
# give every step the same thing: the deepest entry (`"last"`), the shallowest (`"first"`,
# which only step 1 writes), or the mean over the four steps (`"average"`). `"mod-2"` is less
# obvious: slot $(t - 1) \bmod 2$ is written by steps 1 and 3, and step 3 writes last, so
# step 1 of the next token reads the earlier token's step-3 entry, not its step-1 entry. With
# Huginn's mod-$K$ every step reads the deepest entry of its residue class. The coda blocks,
# not drawn, get the same slots as the core.

# %% [markdown]
# ## 7.4 Generation
#
# `generate(model, idx, max_new_tokens, ...)` runs the prefill and then the decoding loop:
#
# - **prompts**: a LongTensor $[B, T]$ of equal-length prompts, or a list of token-id lists (or
#   1-D tensors) of different lengths. They are left-padded with `pad_id`; each row's positions
#   start at 0 at its first real token.
# - **prefill** runs every step on the whole prompt and fills the prompt part of the cache.
#   The first new token comes from the last prompt column, read out at the step the exit rule
#   picks (every step was computed anyway).
# - **decoding** feeds one token per row. Rows that produced a stop token are done: they are
#   left out of all later work, and their remaining columns are `pad_id` with step count 0.
#   `stop_tokens` is a list, tuple or set of token ids (`[eos]` for one).
# - **choosing**: greedy by default (`temperature=0`); with `temperature > 0` tokens are
#   sampled from the softmax of the logits divided by the temperature, restricted to the
#   `top_k` most likely when given.
# - **exit rule** (section 7.7): None runs every step; an `ExitRule` from chapter 5 stops each
#   token on its own.
# - **randomness**: `generator` (a `torch.Generator`) drives every random draw, the sampled
#   tokens and, for a model with `init_state="random"`, the initial state of the prompt and of
#   every decoded position. Two calls with equally seeded generators give the same result, and
#   torch's global generator is left alone.
#
# The result records the tokens, the steps each new token used, the logits it was chosen
# from (in the model's precision, at least float32: float64 for a model converted with
# `.double()`), and the cache's bytes. The function checks every argument before it computes
# anything, the model's weights included: a model holding a NaN or an infinity gets an error,
# not tokens.

# %%
#| export
@dataclass
class GenerationResult:
    """What generate() returns. new = max_new_tokens columns (pad_id, step 0 after a stop)."""

    tokens: torch.Tensor          # [B, T_prompt + new] prompts (left-padded with pad_id), then new tokens
    steps: torch.Tensor           # [B, new] loop steps each new token used, from 1; 0 after a stop
    logits: torch.Tensor          # [B, new, V] the readout each new token was chosen from
    prompt_lengths: torch.Tensor  # [B] real prompt tokens per row
    cache_bytes: int              # bytes of the KV cache tensors
    strategy: str                 # the cache strategy's name
    seconds: dict = field(default_factory=dict)  # wall time of "prefill" and "decode"
    cache: object = None          # the LoopKVCache (for inspection)
    expert_load: torch.Tensor | None = None   # [S, E] with experts (chapter 9): per step, the share of the
                                  # decoded tokens' routed assignments per expert (0 where none ran)

    @property
    def new_tokens(self):
        """[B, new]: the generated part of tokens."""
        return self.tokens[:, self.tokens.shape[1] - self.steps.shape[1]:]

    def sequences(self):
        """Per row: the prompt and the generated tokens up to and including a stop token."""
        out = []
        for row, length in enumerate(self.prompt_lengths.tolist()):
            prompt = self.tokens[row, self.tokens.shape[1] - self.steps.shape[1] - length:
                                 self.tokens.shape[1] - self.steps.shape[1]]
            new = self.new_tokens[row][self.steps[row] > 0]
            out.append(prompt.tolist() + new.tolist())
        return out

# %% [markdown]
# The argument checks come first. `_prompt_batch` turns the prompts into the padded tensor
# and refuses empty prompts, ids out of range, and prompts that would run past the model's
# context (`max_seq_len`, which the rotary tables cover) once `max_new_tokens` are added.
# Every new token but the last is fed back, so a prompt of $P$ tokens leaves room for
# `max_seq_len` $- P + 1$ new tokens.
# `_check_generate_args` checks the rest: every count is an int (a bool is not), the stop
# tokens are a collection of ids, the weights are finite, and the cache fits in memory.

# %%
#| export
def _prompt_batch(idx, vocab_size, pad_id, max_new_tokens, max_seq_len):
    """-> (padded [B, Tp] LongTensor, lengths [B]) from a [B, T] tensor or a list of sequences."""
    if isinstance(idx, torch.Tensor):
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must be an integer tensor (torch.long), got dtype {idx.dtype}")
        if idx.ndim != 2:
            raise ValueError(f"idx must have shape [B, T] (or be a list of prompts), got {list(idx.shape)}")
        rows = list(idx.long())
    elif isinstance(idx, (list, tuple)):
        rows = []
        for i, row in enumerate(idx):
            if isinstance(row, torch.Tensor):
                if row.ndim != 1 or row.dtype not in (torch.int64, torch.int32):
                    raise ValueError(f"prompt {i} must be a 1-D integer tensor, got {row.dtype} {list(row.shape)}")
                rows.append(row.long())
            elif isinstance(row, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in row):
                rows.append(torch.tensor(row, dtype=torch.long))
            else:
                raise TypeError(f"prompt {i} must be a list of int token ids or a 1-D tensor, got {row!r:.60}")
    else:
        raise TypeError(f"idx must be a LongTensor [B, T] or a list of prompts, got {type(idx).__name__}")
    if not rows:
        raise ValueError("there are no prompts: idx is empty")
    for i, row in enumerate(rows):
        if row.numel() == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to start from")
        low, high = row.min().item(), row.max().item()
        if low < 0 or high >= vocab_size:
            raise ValueError(f"prompt {i} holds ids outside [0, vocab_size={vocab_size}): min {low}, max {high}")
    longest = max(row.numel() for row in rows)
    if longest > max_seq_len:
        raise ValueError(f"the longest prompt has {longest} tokens, more than the model's context holds "
                         f"(max_seq_len={max_seq_len}), which leaves room for at most {max_seq_len} prompt tokens")
    if longest + max_new_tokens - 1 > max_seq_len:
        raise ValueError(f"the longest prompt has {longest} tokens, and max_new_tokens={max_new_tokens} more need "
                         f"{longest + max_new_tokens - 1} positions (every new token but the last is fed back), "
                         f"but the model's context holds max_seq_len={max_seq_len}: it leaves room for at most "
                         f"{max_seq_len - longest + 1} new tokens after this prompt")
    lengths = torch.tensor([row.numel() for row in rows])
    padded = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, longest - row.numel():] = row
    return padded, lengths


def _check_finite_weights(model):
    """ValueError naming the first parameter that holds a NaN or an infinity."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"the model's parameter {name} holds non-finite values (NaN or inf), so every "
                             f"prediction it makes is meaningless; generate refuses to decode with it")


def _check_generate_args(model, max_new_tokens, temperature, top_k, stop_tokens, exit_rule, n_loops, pad_id,
                         generator, record):
    if not isinstance(model, LoopLM):
        raise TypeError(f"model must be a LoopLM, got {type(model).__name__}")
    c = model.config
    require_int("max_new_tokens", max_new_tokens, 0)
    n_loops = c.n_loops if n_loops is None else require_int("n_loops", n_loops, 1)
    require_number("temperature", temperature, 0)                  # 0: greedy
    if top_k is not None:
        require_int("top_k", top_k, 1)
    if isinstance(pad_id, bool) or not (isinstance(pad_id, int) and 0 <= pad_id < c.vocab_size):
        raise ValueError(f"pad_id must be an int token id in [0, {c.vocab_size}), got {pad_id!r}")
    if stop_tokens is not None and not isinstance(stop_tokens, (list, tuple, set, frozenset)):
        raise TypeError(f"stop_tokens must be None or a list, tuple or set of token ids (e.g. [{stop_tokens!r}] "
                        f"for one), got {type(stop_tokens).__name__} {stop_tokens!r:.40}")
    stops = set()
    for t in (stop_tokens or ()):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < c.vocab_size:
            raise ValueError(f"stop_tokens must be token ids in [0, {c.vocab_size}), got {t!r}")
        stops.add(t)
    _check_generator(generator)
    require_bool("record", record)
    if isinstance(exit_rule, str):
        exit_rule = make_exit_rule(exit_rule)                      # at its default threshold
    if exit_rule is not None and not isinstance(exit_rule, ExitRule):
        raise TypeError(f"exit_rule must be None, an ExitRule or a name in EXIT_RULES, got {type(exit_rule).__name__}")
    if exit_rule is not None and "gates" in exit_rule.needs and model.exit_gate is None:
        raise ValueError(f"{type(exit_rule).__name__} reads the exit gate, and this model was built without "
                         f"one: use LoopLMConfig(..., exit_gate=True) or another rule")
    _check_finite_weights(model)
    return n_loops, stops, exit_rule


def _check_exit_options(model, rule, exit_mode, weighted_exit):
    """Chapter 8's two options: exit_mode 'skip' or 'select', and weighted_exit (gate, no rule)."""
    if exit_mode not in ("skip", "select"):
        raise ValueError(f"exit_mode must be 'skip' (an exited token's deeper steps never run) or 'select' "
                         f"(every step runs, the rule picks the readout), got {exit_mode!r}")
    require_bool("weighted_exit", weighted_exit)
    if weighted_exit and model.exit_gate is None:
        raise ValueError("weighted_exit=True averages the steps' logits with the exit distribution, and this "
                         "model was built without an exit gate: use LoopLMConfig(..., exit_gate=True)")
    if weighted_exit and rule is not None:
        raise ValueError(f"weighted_exit=True reads out every step, weighted, so it cannot also exit with "
                         f"{rule!r}: pass exit_rule=None, or weighted_exit=False")


def _check_cache_fits(model, strategy, batch, prompt_len, n_new, n_steps, device):
    """ValueError when the cache's tensors would not fit in this machine's memory (CPU only)."""
    c = model.config
    slots = strategy.n_slots(n_steps)
    per_position = 2 * batch * c.kv_heads * c.head_dim * next(model.parameters()).element_size()
    positions = c.n_prelude * (prompt_len + n_new) + (c.n_core + c.n_coda) * (n_steps * prompt_len + slots * n_new)
    available = _physical_memory_bytes() if device.type == "cpu" else None
    if available is not None and per_position * positions > available:
        raise ValueError(f"the KV cache for n_loops={n_steps}, {batch} prompt(s) of {prompt_len} tokens and "
                         f"{n_new} decoded tokens would need {per_position * positions / 2**30:,.1f} GiB, and "
                         f"this machine has {available / 2**30:,.1f} GiB of memory; use fewer loop steps "
                         f"(n_loops), a shorter generation or a sharing cache strategy")

# %% [markdown]
# Choosing a token from logits: the argmax, or a draw from the tempered softmax, optionally
# cut to the `top_k` largest logits. The division by the temperature is where sampling can
# break: in float32 a temperature of $10^{-300}$ rounds to 0, and the logits divided by it are
# infinities, or NaN where a logit is 0. So we subtract each row's largest logit first, in
# float64: the scaled logits $(\mathrm{logits} - \max \mathrm{logits}) / \tau$ are all
# $\le 0$, the largest is exactly 0, and the softmax stays finite however small $\tau$ is.
# A tiny temperature then puts all the mass on the largest logit, which is greedy decoding
# (a tie is split evenly).

# %%
#| export
def choose_tokens(logits, temperature=0.0, top_k=None, generator=None):
    """logits [R, V] -> token ids [R]: argmax if temperature == 0, else a tempered top-k draw."""
    if temperature == 0:
        return logits.argmax(-1)
    wide = logits.double()
    scaled = (wide - wide.amax(-1, keepdim=True)) / temperature       # (R, V), <= 0, the max is 0
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]                # (R, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)

# %% [markdown]
# The prefill: every step on the whole (padded) prompt. It runs the model's own pieces,
# chapter 2's `encode`, `step` and `readout` and the model's `init_state`, and hands each of
# them the cache's prefill `attend` for block $i$ as `attend=lambda i: ...`. So whatever a
# model (or a subclass) does in a step, decoding does too: there is no second copy of the
# loop to drift from `forward`. It keeps the last column's readout, gate and state at every
# step, which is what the exit rule needs to pick the first new token's step. The LM head
# runs on the last column only (`last_only=True`); the coda runs on all columns because its
# cache needs them.

# %%
#| export
def _logits_dtype(model):
    """The precision of generate's logits: the model's, at least float32."""
    return torch.promote_types(next(model.parameters()).dtype, torch.float32)


def _prefill(model, cache, prompt, positions, n_steps, generator=None):
    """Fill the cache from the prompt [B, Tp]; -> per-step logits [S, B, V], gates [S, B] or None,
    hidden [S, B, D] of the last column."""
    cos, sin = model.rope.cos[positions], model.rope.sin[positions]       # (B, Tp, hs/2)
    x0 = model.encode(prompt, cos, sin, attend=lambda i: cache.prefill_attend("prelude", i, 1))   # (B, Tp, D)
    h = model.init_state(x0, generator=generator)
    logits, gates, hidden = [], [], []
    for s in range(1, n_steps + 1):
        h = model.step(h, x0, cos, sin, attend=lambda l: cache.prefill_attend("core", l, s))
        step_logits, z = model.readout(h, cos, sin, attend=lambda j: cache.prefill_attend("coda", j, s),
                                       last_only=True)                     # (B, 1, V), (B, 1, D)
        logits.append(step_logits[:, 0])
        hidden.append(h[:, -1])
        if model.exit_gate is not None:
            gates.append(model.exit_gate(z)[:, 0])
    return torch.stack(logits), (torch.stack(gates) if gates else None), torch.stack(hidden)

# %% [markdown]
# ## 7.5 Decoding one position, with per-token early exit
#
# `_decode_position` feeds one token to each row in `rows` and runs the loop. After each step
# it reads out, asks the exit rule which tokens stop (every token stops at step $S$), records
# the stopping tokens' logits and step, and **drops them from the batch**: the next step runs
# the core only on the rows still going. That is where the saving comes from. The rows still
# going are indexed out of the cache (`rows`), attend, and write their entries in place.
#
# A token that stops at step $e < S$ never computes its keys and values for steps
# $e+1, \dots, S$. Later tokens read those entries, so something must be there. Our rule,
# **deepest-state fill**: *the token's cache entry for every deeper step $t > e$, in every
# core and coda block, is a copy of its entry for step $e$* (`LoopKVCache.fill_deeper`). It is
# Huginn's "attend to the last, deepest available KV states", written into the cache once
# when the token exits, so that reading stays uniform. It costs no compute. A later token at
# step $t$ thus sees an early-exited token as it was at its exit step, which is the best
# description of that token the model produced.

# %% [markdown]
# Section 7.3's figure again, now for an earlier token that exited at step $e = 2$: the cache
# ran its steps 1 and 2, then `fill_deeper`. The hatched cells are the entries the fill wrote.
# In `"exact"` the entries of steps 3 and 4 are copies of step 2. In `"mod-2"` the slot that
# step 1 left behind is overwritten with step 2 too, since steps 3 and 4 map to both slots.
# The one-slot strategies need no fill: `"last"` already holds step 2, and `"first"` and
# `"average"` hold what the token wrote (the mean now runs over steps 1 and 2 only).

# %% tags=["hide-input"]
draw_cache_strategies(2, "The same, when the earlier token exited at step e = 2",
                      "Hatched: a copy of its step-2 entry, written by fill_deeper when it exited. "
                      "Light: a step the earlier token never ran, or ran without writing.")

# %%
#| export
def _count_routing(model, blocks, load, step):
    """Add the kept expert assignments of `blocks`' last calls to load[step] (experts, chapter 9)."""
    if load is not None:
        for _, record in model.take_routing(blocks):
            load[step] += torch.bincount(record.chosen[record.kept], minlength=load.shape[1]).to(load.dtype)


def _decode_position(model, cache, tokens, positions, rows, rule, n_steps, generator=None, mode="skip",
                     weighted=False, load=None):
    """Run one new token per row; -> (logits [R, V] at each token's exit step, steps [R] from 1).

    tokens, positions [R]; rows: the batch rows they belong to (None: all rows, in order).
    mode "skip": a token that exits stops running; "select": every token runs every step and
    the rule only picks the readout (chapter 8). weighted: read out Σ_t p_t logits_t instead.
    load [S, E]: where a mixture of experts counts the assignments of the steps that ran (chapter 9).
    """
    R = tokens.shape[0]
    dtype = _logits_dtype(model)
    cos, sin = model.rope.cos[positions][:, None], model.rope.sin[positions][:, None]   # (R, 1, hs/2)
    x0 = model.encode(tokens[:, None], cos, sin,
                      attend=lambda i: cache.decode_attend("prelude", i, 1, rows))      # (R, 1, D)
    _count_routing(model, model.prelude, load, 0)
    h = model.init_state(x0, generator=generator)
    out_logits = torch.zeros(R, model.config.vocab_size, device=tokens.device, dtype=dtype)
    out_steps = torch.full((R,), n_steps, dtype=torch.long, device=tokens.device)
    all_rows = torch.arange(cache.batch, device=tokens.device) if rows is None else rows
    live = torch.arange(R, device=tokens.device)              # local indices still running
    undecided = torch.ones(R, dtype=torch.bool, device=tokens.device)   # no readout picked yet
    sub = rows                                                # their batch rows (None: all)
    need_gate = weighted or (rule is not None and "gates" in rule.needs)
    gates = torch.zeros(n_steps, R, device=tokens.device, dtype=dtype) if need_gate else None
    step_logits = []                                          # every step's readout (weighted)
    prev_logits = prev_hidden = None
    for s in range(1, n_steps + 1):
        h = model.step(h, x0, cos, sin, attend=lambda l: cache.decode_attend("core", l, s, sub))
        _count_routing(model, model.core, load, s - 1)
        logits, z = model.readout(h, cos, sin, attend=lambda j: cache.decode_attend("coda", j, s, sub),
                                  last_only=True)
        _count_routing(model, model.coda, load, s - 1)
        logits, state = logits[:, 0], h[:, 0]                                           # (r, V), (r, D)
        if need_gate:
            gates[s - 1, live] = model.exit_gate(z)[:, 0].to(dtype)
        if weighted:
            step_logits.append(logits.to(dtype))
        if s == n_steps:
            stop = torch.ones(live.shape[0], dtype=torch.bool, device=tokens.device)
        elif rule is None:
            stop = torch.zeros(live.shape[0], dtype=torch.bool, device=tokens.device)
        else:
            view = StepView(step=s, logits=logits, prev_logits=prev_logits,
                            gates=gates[:s, live] if need_gate else None, hidden=state, prev_hidden=prev_hidden)
            stop = rule.stop(view)
        stop = stop & undecided[live]
        if stop.any():
            leaving = live[stop]
            out_logits[leaving], out_steps[leaving] = logits[stop].to(dtype), s
            undecided[leaving] = False
            if mode == "skip":                                # the exited tokens stop running
                if s < n_steps:
                    cache.fill_deeper(all_rows[leaving], s)
                keep = ~stop
                if not keep.any():
                    break
                live, h, x0, cos, sin = live[keep], h[keep], x0[keep], cos[keep], sin[keep]
                logits, state = logits[keep], state[keep]
                sub = all_rows[live]
        prev_logits, prev_hidden = logits, state
    if weighted:                                              # Σ_t p_t logits_t, every step ran
        probs = model.exit_gate.exit_probs(gates)[..., None]                  # (S, R, 1)
        out_logits = (probs * torch.stack(step_logits)).sum(0)
    return out_logits, out_steps

# %% [markdown]
# `generate` puts the pieces together. The cache has room for `max_new_tokens - 1` decoded
# tokens: the last new token is chosen but never fed back.

# %%
#| export
@torch.no_grad()
def generate(model, idx, max_new_tokens, *, temperature=0.0, top_k=None, stop_tokens=None, cache="exact",
             exit_rule=None, n_loops=None, pad_id=0, generator=None, record=False, exit_mode="skip",
             weighted_exit=False):
    """KV-cached decoding of a LoopLM: prefill, then one token at a time. -> GenerationResult.

    idx: LongTensor [B, T] or a list of prompts (lists of ids or 1-D tensors) of any lengths,
    left-padded with pad_id. Defaults: greedy, the exact cache, every step (no early exit).
    cache: "exact", "last", "first", "average" or "mod-K" (decoded tokens only; the prompt is
    always cached per step). exit_rule: None, an ExitRule (looplm.exits) or a rule's name, per token; a
    token that exits at step e skips steps e+1..S, and its entries for those steps are copies
    of its step-e entries. stop_tokens: a list, tuple or set of ids that end a row (kept in the
    output). generator: a torch.Generator for every random draw (sampling, a random initial state).
    Logits come in the model's precision, at least float32. Chapter 8 adds two options:
    exit_mode="select" runs every step for every token (each fills its cache entries) and lets
    the rule only pick which step's readout to use (Ouro's semantics); weighted_exit=True reads
    out Σ_t p(t|x) logits_t over all steps (Ouro's use_weighted_exit; needs a gate, no rule).
    """
    n_steps, stops, rule = _check_generate_args(model, max_new_tokens, temperature, top_k, stop_tokens,
                                                exit_rule, n_loops, pad_id, generator, record)
    _check_exit_options(model, rule, exit_mode, weighted_exit)
    strategy = cache_strategy(cache)
    c = model.config
    prompt, lengths = _prompt_batch(idx, c.vocab_size, pad_id, max_new_tokens, c.max_seq_len)
    device = next(model.parameters()).device
    prompt, lengths = prompt.to(device), lengths.to(device)
    B, Tp = prompt.shape
    _check_cache_fits(model, strategy, B, Tp, max(max_new_tokens - 1, 0), n_steps, device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    steps = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    all_logits = torch.zeros((B, max_new_tokens, c.vocab_size), device=device, dtype=_logits_dtype(model))
    mask = torch.arange(Tp, device=device)[None] >= (Tp - lengths)[:, None]           # (B, Tp) real columns
    kv = LoopKVCache(model, strategy, mask, max(max_new_tokens - 1, 0), n_steps, record=record)
    seconds = {"prefill": 0.0, "decode": 0.0}
    if max_new_tokens == 0:
        return GenerationResult(prompt, steps, all_logits, lengths, kv.nbytes(), strategy.name, seconds, kv)

    load = None if c.mlp == "dense" else torch.zeros(n_steps, c.moe_shape[0], dtype=torch.float64, device=device)
    start = time.perf_counter()
    positions = (torch.arange(Tp, device=device)[None] - (Tp - lengths)[:, None]).clamp_min(0)   # (B, Tp)
    step_logits, gates, hidden = _prefill(model, kv, prompt, positions, n_steps, generator)
    if rule is None:
        first_steps = torch.full((B,), n_steps, dtype=torch.long, device=device)
    else:
        first_steps = exit_steps(rule, logits=step_logits, gate=gates, hidden=hidden)
    logits = step_logits[first_steps - 1, torch.arange(B, device=device)].to(all_logits.dtype)   # (B, V)
    if weighted_exit:                                         # Σ_t p_t logits_t over the S steps
        probs = model.exit_gate.exit_probs(gates.to(all_logits.dtype))[..., None]          # (S, B, 1)
        logits = (probs * step_logits.to(all_logits.dtype)).sum(0)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    active = torch.arange(B, device=device)
    seconds["prefill"] = time.perf_counter() - start

    start = time.perf_counter()
    for n in range(max_new_tokens):
        if n > 0:
            rows = None if active.numel() == B else active
            logits, used = _decode_position(model, kv, tokens[active, n - 1], lengths[active] + n - 1,
                                            rows, rule, n_steps, generator, exit_mode, weighted_exit, load)
            kv.n_decoded += 1
        else:
            used = first_steps
        chosen = choose_tokens(logits, temperature, top_k, generator)
        tokens[active, n], steps[active, n], all_logits[active, n] = chosen, used, logits
        if stops:
            done[active] = torch.isin(chosen, torch.tensor(sorted(stops), device=device))
            active = (~done).nonzero().squeeze(1)
            if active.numel() == 0:
                break
    seconds["decode"] = time.perf_counter() - start
    if load is not None:
        load = load / load.sum(1, keepdim=True).clamp_min(1)
    return GenerationResult(torch.cat([prompt, tokens], dim=1), steps, all_logits, lengths, kv.nbytes(),
                            strategy.name, seconds, kv, expert_load=load)

# %% [markdown]
# ## 7.6 Cached decoding equals recomputing everything
#
# The reference is the slowest correct decoder there is: for every new token, run the model's
# full forward over the whole sequence so far, take the last step's logits at the last
# position, pick the argmax, append, repeat. Cached decoding must give the same logits
# (within 1e-5 in float32) and the same tokens, for every model layout: with a prelude and a
# coda, with two core blocks, every injection and every norm style.
#
# Batched decoding of prompts of different lengths must give what decoding each prompt alone
# gives: the left padding and the per-row positions must be invisible. And the invariant: at
# every decode-time attention call, the number of keys read equals the number of positions
# seen (the cache's log holds both).

# %% tags=["remove-cell"]
#| export testing
import torch

from looplm.model import LoopLM, LoopLMConfig

# The model layouts decoding is tested on (chapter 7 and Appendix C): the default, one with a
# prelude, two core blocks, a coda, additive injection and sandwich norms, and one with a coda,
# concatenated injection, zero initial state, Huginn's norms and an exit gate.
LAYOUTS = [
    dict(),
    dict(n_prelude=1, n_core=2, n_coda=1, injection="add", norm_style="sandwich"),
    dict(n_coda=1, injection="concat", init_state="zeros", norm_style="huginn", exit_gate=True),
]


def small_model(seed=0, n_loops=3, **options):
    """A tiny seeded LoopLM (vocabulary 23, width 32, 4 heads, 40 positions) for decoding tests."""
    torch.manual_seed(seed)
    return LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_loops=n_loops, max_seq_len=40, **options))


def recompute_greedy(model, prompt, n_new, n_loops=None):
    """The slow reference decoder: the full forward at every position, last step, argmax.
    -> (new tokens [n_new], their logits [n_new, V])."""
    seq, logits = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n_new):
            last = model(seq, n_loops=n_loops).logits[-1, 0, -1]               # (V,)
            logits.append(last)
            seq = torch.cat([seq, last.argmax().view(1, 1)], dim=1)
    return seq[0, len(prompt):], torch.stack(logits)

# %% tags=["remove-cell"]
#| test
import pytest
import torch

from looplm.exits import make_exit_rule
from looplm.model import LoopLM, LoopLMConfig
from looplm.testing import LAYOUTS, recompute_greedy, small_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine makes two threads much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_exact_cache_equals_full_recompute():
    for options in LAYOUTS:
        model = small_model(**options)
        tokens, logits = recompute_greedy(model, [1, 5, 7, 3, 9], 10)
        res = generate(model, [[1, 5, 7, 3, 9]], 10)
        assert torch.equal(res.new_tokens[0], tokens), options
        torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)
        assert (res.steps == model.config.n_loops).all()


def test_batched_equals_alone():
    prompts = [[1, 5, 7, 3, 9], [2, 2], [4, 6, 8, 10, 12, 14, 3], [7]]
    for options in LAYOUTS:
        model = small_model(**options)
        batch = generate(model, prompts, 6)
        assert batch.tokens.shape == (4, 7 + 6) and batch.prompt_lengths.tolist() == [5, 2, 7, 1]
        for row, prompt in enumerate(prompts):
            alone = generate(model, [prompt], 6)
            assert torch.equal(alone.new_tokens[0], batch.new_tokens[row]), (options, row)
            torch.testing.assert_close(batch.logits[row], alone.logits[0], atol=1e-5, rtol=0)
            assert batch.sequences()[row] == alone.sequences()[0]


def test_cache_length_equals_tokens_seen():
    model = small_model(**LAYOUTS[1])
    for cache in ("exact", "last", "mod-2"):
        res = generate(model, [[1, 5, 7], [3, 4, 5, 6, 8]], 7, cache=cache, record=True)
        assert res.cache.length == 5 + 6                           # prompt columns + fed-back tokens
        log = res.cache.log
        assert len(log) == 6 * (1 + 3 * (2 + 1))                   # per token: prelude + S x (core + coda)
        assert all(keys == seen for *_, keys, seen in log)


run_tests(test_exact_cache_equals_full_recompute, test_batched_equals_alone, test_cache_length_equals_tokens_seen)

# %% [markdown]
# Appendix C.15 holds the regression tests around these: decoding runs the model's own `step`
# (a subclass that changes it decodes differently), an explicit `n_loops`, float64 models,
# seeded random initial states, tiny temperatures and stop tokens.

# %% [markdown]
# The strategies next. Two identities pin them down: with $K = S$ slots, `"mod-K"` is the exact
# cache, and with one slot it is `"last"`, on every decoded token. All strategies give the
# first token exactly (it comes from the prefill); every later token reads shared entries,
# and its logits must show it (otherwise the strategies would not be in use at all). Their
# bytes follow the formulas of section 7.3.

# %% tags=["remove-cell"]
#| test
def test_strategy_identities_and_bytes():
    model = small_model(**LAYOUTS[1])                       # 1 prelude, 2 core, 1 coda block, S = 3
    prompt = [[1, 5, 7, 3, 9]]
    exact = generate(model, prompt, 8)
    same = {"mod-3": "exact", "mod-5": "exact", "mod-1": "last"}
    for name, twin in same.items():
        a, b = generate(model, prompt, 8, cache=name), generate(model, prompt, 8, cache=twin)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits), name
        torch.testing.assert_close(a.logits[0, 1:], b.logits[0, 1:], atol=1e-5, rtol=0)   # every decoded token
    c = model.config
    position = 2 * c.d_model * 4                            # k and v of one position in one block, float32
    for name, slots in (("exact", 3), ("last", 1), ("first", 1), ("average", 1), ("mod-2", 2)):
        res = generate(model, prompt, 8, cache=name)
        torch.testing.assert_close(res.logits[:, 0], exact.logits[:, 0])     # the first token: from the prefill
        if name != "exact":                                  # the later tokens read shared entries
            assert (res.logits[0, 1:] - exact.logits[0, 1:]).abs().max() > 1e-4, name
        expected = position * (1 * (5 + 7) + (2 + 1) * (3 * 5 + slots * 7))
        assert res.cache_bytes == expected, name


run_tests(test_strategy_identities_and_bytes)

# %% [markdown]
# The identities say nothing about `"first"`, `"average"` or `"mod-K"` with $1 < K < S$. A
# hidden test checks every strategy against a decoder written without a cache object: it runs
# one position at a time and keeps every position's keys and values for every block and step,
# as they were computed when that position was the newest. A query at step $t$ then reads
# each decoded position's entry that the strategy leaves in the slot step $t$ reads: step $t$
# (exact), step $S$ (last), step 1 (first), the mean over the steps (average), or for
# `"mod-K"` the last step $u \le S$ with $(u-1) \bmod K = (t-1) \bmod K$, the one that wrote
# that slot last. With $K = 2$ and $S = 4$, step 1 thus reads the step-3 entries.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def reference_shared_decode(model, prompt, n_new, strategy):
    """Greedy decoding under a cache strategy, without a cache: one position at a time, with every
    position's (k, v) of every block and step kept as computed when it was the newest position."""
    S = model.config.n_loops

    def read(entries, t):                 # entries: [(k, v) of step 1, ..., of step S] of one position
        if strategy == "average":
            return tuple(torch.stack(x).mean(0) for x in zip(*entries))
        if strategy.startswith("mod-"):
            K = int(strategy[4:])
            return entries[max(u for u in range(1, S + 1) if (u - 1) % K == (t - 1) % K) - 1]
        return entries[{"exact": t, "last": S, "first": 1}[strategy] - 1]

    store, seq, all_logits = {}, list(prompt), []

    def attend_for(part, t, pos):
        def for_block(i):
            def attend(q, k, v):                                   # (1, nh, 1, hs) each
                history = store.setdefault((part, i), [])
                if len(history) == pos:
                    history.append([])
                history[pos].append((k, v))                        # index t - 1: this position's step t
                if part == "prelude":
                    earlier = [history[j][0] for j in range(pos)]
                else:
                    earlier = [history[j][t - 1] if j < len(prompt) else read(history[j], t) for j in range(pos)]
                keys = torch.cat([e[0] for e in earlier] + [k], dim=2)
                values = torch.cat([e[1] for e in earlier] + [v], dim=2)
                return torch.nn.functional.scaled_dot_product_attention(q, keys, values)
            return attend
        return for_block

    with torch.no_grad():
        for pos in range(len(prompt) + n_new - 1):
            cos, sin = model.rope.cos[pos:pos + 1], model.rope.sin[pos:pos + 1]
            x0 = model.encode(torch.tensor([[seq[pos]]]), cos, sin, attend=attend_for("prelude", 1, pos))
            h = model.init_state(x0)
            for t in range(1, S + 1):
                h = model.step(h, x0, cos, sin, attend=attend_for("core", t, pos))
                logits, _ = model.readout(h, cos, sin, attend=attend_for("coda", t, pos))
            if pos >= len(prompt) - 1:                             # the last step's readout picks the next token
                all_logits.append(logits[0, -1])
                seq.append(logits[0, -1].argmax().item())
    return torch.tensor(seq[len(prompt):]), torch.stack(all_logits)


def test_every_strategy_equals_a_reference_without_a_cache():
    model = small_model(n_loops=4, **LAYOUTS[1])            # 1 prelude, 2 core, 1 coda block, S = 4
    for strategy in ("exact", "last", "first", "average", "mod-2", "mod-3"):
        tokens, logits = reference_shared_decode(model, [1, 5, 7, 3, 9], 7, strategy)
        res = generate(model, [[1, 5, 7, 3, 9]], 7, cache=strategy)
        assert torch.equal(res.new_tokens[0], tokens), strategy
        torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)


run_tests(test_every_strategy_equals_a_reference_without_a_cache)

# %% [markdown]
# ## 7.7 Early exit that skips the work
#
# Now the exit rules of chapter 5, applied while decoding. Two checks make them trustworthy.
#
# **A rule that never fires** (a confidence threshold of 1.0 that no softmax reaches, or
# chapter 5's `"fixed"` rule at $S$) must give exactly full-depth decoding.
#
# **A rule that fires** must give, for every token, the readout of the step it exited at,
# in a model whose earlier tokens exited too and whose cache was filled by the deepest-state
# rule. The reference below writes that definition out without a cache: it recomputes the
# whole sequence at every new token, step by step, and at step $t$ replaces the keys and
# values of every earlier position $j$ that exited at $e_j < t$ by the ones that position
# produced at step $e_j$. Prompt positions never exit early (the prefill runs every step). The
# last position's exit step comes from the rule applied to its own readouts, exactly as
# `exit_steps` would apply it to stored per-step outputs.
#
# One more identity is a good test of the fill rule: with `"fixed"` at $n < S$, every decoded
# token stops at step $n$, so nothing deeper is ever read except copies, and the decoding must
# equal recomputing with a model run for $n$ steps (`model(idx, n_loops=n)`), because the
# prompt's first $n$ steps are the same in both.

# %% tags=["remove-cell"]
#| test
from looplm.exits import ExitRule, exit_steps, select_exit_logits


def _reference_attention(block, u, cos, sin, saved, key, exit_at, t):
    q, k, v = block.attn.project_qkv(u, cos, sin)                           # (1, nh, T, hs)
    for j, e in enumerate(exit_at):
        if e < t:                                                           # exited: its step-e entry
            k[:, :, j], v[:, :, j] = saved[key + (e,)][0][:, :, j], saved[key + (e,)][1][:, :, j]
    saved[key + (t,)] = (k, v)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return block.attn.project_out(y)


def _reference_block(block, x, cos, sin, saved, key, exit_at, t):
    """Block.forward with the exited positions' keys and values replaced."""
    attention = lambda u: _reference_attention(block, u, cos, sin, saved, key, exit_at, t)
    if block.norm_style == "pre":
        n1, n2 = block.norms
        x = x + attention(n1(x))
        return x + block.mlp(n2(x))
    n1, n2, n3, n4 = block.norms
    if block.norm_style == "sandwich":
        x = x + n2(attention(n1(x)))
        return x + n4(block.mlp(n3(x)))
    x = n2(x + attention(n1(x)))
    return n4(x + block.mlp(n3(x)))


def reference_early_exit(model, prompt, n_new, rule):
    """Greedy decoding with per-token exits and the deepest-state fill, recomputed from scratch."""
    S = model.config.n_loops
    seq, exit_at, all_logits, all_steps = list(prompt), [S] * len(prompt), [], []
    with torch.no_grad():
        for _ in range(n_new):
            idx = torch.tensor([seq])
            cos, sin = model.rope(len(seq))
            x0 = model.encode(idx, cos, sin)
            h, saved, logits, gates, hidden = model.init_state(x0), {}, [], [], []
            for t in range(1, S + 1):
                u = model.injection(h, x0)
                for l, block in enumerate(model.core):
                    u = _reference_block(block, u, cos, sin, saved, ("core", l), exit_at, t)
                h = u
                z = h
                for j, block in enumerate(model.coda):
                    z = _reference_block(block, z, cos, sin, saved, ("coda", j), exit_at, t)
                z = model.norm(z)
                logits.append(model.lm_head(z)[0, -1])
                hidden.append(h[0, -1])
                if model.exit_gate is not None:
                    gates.append(model.exit_gate(z)[0, -1])
            logits, hidden = torch.stack(logits), torch.stack(hidden)                 # (S, V), (S, D)
            gate = torch.stack(gates) if gates else None
            step = exit_steps(rule, logits=logits[:, None], gate=None if gate is None else gate[:, None],
                              hidden=hidden[:, None])                                 # (1,)
            chosen = select_exit_logits(logits[:, None], step)[0]
            if len(seq) > len(prompt):
                exit_at[-1] = step.item()      # the fed-back token's exit; the prompt's last stays S
            all_logits.append(chosen)
            all_steps.append(step.item())
            seq.append(chosen.argmax().item())
            exit_at.append(S)
    return torch.tensor(seq[len(prompt):]), torch.stack(all_logits), torch.tensor(all_steps)


class ParityExit(ExitRule):
    """A test rule that fires often and irregularly: stop when the top token's id is even."""

    name, needs, stop_above = "parity", ("logits",), True

    def score(self, view):
        return (view.logits.argmax(-1) % 2 == 0).float()

# %% tags=["remove-cell"]
#| test
def test_a_rule_that_never_fires_is_full_depth():
    for options in LAYOUTS:
        model = small_model(n_loops=4, **options)
        full = generate(model, [[1, 5, 7], [3, 9]], 8)
        for rule in (make_exit_rule("fixed", 4), make_exit_rule("confidence", 1.0)):
            res = generate(model, [[1, 5, 7], [3, 9]], 8, exit_rule=rule)
            assert torch.equal(res.tokens, full.tokens) and torch.equal(res.logits, full.logits)
            assert (res.steps == 4).all()


def test_each_token_is_the_readout_of_its_exit_step():
    for options in LAYOUTS:
        model = small_model(n_loops=4, **options)
        rules = [ParityExit(0.5), ParityExit(0.5, min_steps=2), make_exit_rule("kl", 2e-3),
                 make_exit_rule("hidden_change", 0.3)]
        if model.exit_gate is not None:
            rules.append(make_exit_rule("q_exit", 0.6))
        used = set()
        for rule in rules:
            tokens, logits, steps = reference_early_exit(model, [1, 5, 7, 3, 9], 10, rule)
            res = generate(model, [[1, 5, 7, 3, 9]], 10, exit_rule=rule)
            assert torch.equal(res.steps[0], steps), (options, rule)
            assert torch.equal(res.new_tokens[0], tokens), (options, rule)
            torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)
            used |= set(steps.tolist())
        assert len(used) >= 2 and min(used) < 4, used       # the exits really happen, and vary


def test_fixed_depth_equals_a_shallower_model():
    for options in LAYOUTS[:2]:
        model = small_model(n_loops=4, **options)
        tokens, logits = recompute_greedy(model, [1, 5, 7, 3, 9], 8, n_loops=2)
        res = generate(model, [[1, 5, 7, 3, 9]], 8, exit_rule=make_exit_rule("fixed", 2))
        assert torch.equal(res.new_tokens[0], tokens) and (res.steps == 2).all()
        torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)


def test_batched_early_exit_equals_alone():
    prompts = [[1, 5, 7, 3, 9], [2, 2], [4, 6, 8, 10, 12, 14, 3], [7]]
    for options in LAYOUTS:
        model = small_model(n_loops=4, **options)
        for cache in ("exact", "mod-2", "average"):
            batch = generate(model, prompts, 6, exit_rule=ParityExit(0.5), cache=cache, stop_tokens=[3])
            for row, prompt in enumerate(prompts):
                alone = generate(model, [prompt], 6, exit_rule=ParityExit(0.5), cache=cache, stop_tokens=[3])
                assert torch.equal(alone.steps[0], batch.steps[row]), (options, cache, row)
                assert batch.sequences()[row] == alone.sequences()[0]
                torch.testing.assert_close(batch.logits[row], alone.logits[0], atol=1e-5, rtol=0)


def test_fill_rule_copies_the_exit_step():
    model = small_model(n_loops=4, **LAYOUTS[1])
    res = generate(model, [[1, 5, 7, 3, 9]], 9, exit_rule=ParityExit(0.5))
    cache, steps = res.cache, res.steps[0, 1:]               # steps of the fed-back tokens
    assert (steps < 4).any()
    for (group, _), layer in cache.layers.items():
        if group == "prelude":
            continue
        for n, e in enumerate(steps.tolist()):
            for t in range(e + 1, 5):                         # every deeper entry is the step-e entry
                assert torch.equal(layer.new_k[t - 1, 0, :, n], layer.new_k[e - 1, 0, :, n])
                assert torch.equal(layer.new_v[t - 1, 0, :, n], layer.new_v[e - 1, 0, :, n])


run_tests(test_a_rule_that_never_fires_is_full_depth, test_each_token_is_the_readout_of_its_exit_step,
          test_fixed_depth_equals_a_shallower_model, test_batched_early_exit_equals_alone,
          test_fill_rule_copies_the_exit_step)

# %% [markdown]
# ## 7.8 Saving a model, and decoding from a shell
#
# A trained model leaves the notebook as a file. Appendix C builds the two pieces this chapter
# uses: `save_model(path, model)` writes the weights with the loop metadata a decoder needs (the
# config, with the step count and the gate), and `load_model(path)` reads them back, refusing
# files that would run code when unpickled and naming any tensor that does not fit; and
# `python -m looplm.generate`, the decoder as a command line:
#
# ```
# python -m looplm.generate --checkpoint stack.pt --prompt "K12-3=" --cache last --exit-rule q_exit --exit-threshold 0.5
# ```
#
# Section 7.9 runs it on a trained model.

# %% [markdown]
# ## 7.9 A trained model, and what each choice costs
#
# Everything so far ran on random weights, which is enough for equivalences but says nothing
# about quality. We train the model of chapter 5: the stack task (difficulties 1 to 5), one
# core block looped four times, width 64, with an exit gate trained by Ouro's two stages with
# chapter 5's recipe (`train_two_stage`: 700 updates of Stage I, the first half on the last
# step alone, and 200 of Stage II). The numbers below come from the stored run of this
# notebook.

# %%
task = make_task("stack")
splits = make_splits(task, n_train=4000, n_test=300, max_difficulty=5, ood_max_difficulty=7, seed=0)
SEQ_LEN = task.max_seq_len(7)
torch.manual_seed(0)
model = LoopLM(LoopLMConfig(vocab_size=TASK_VOCAB.vocab_size, d_model=64, n_heads=4, n_loops=4,
                            exit_gate=True, max_seq_len=SEQ_LEN))
config = TrainConfig(steps=900, batch_size=32, lr=5e-3, min_lr=5e-4, warmup_steps=50, weight_decay=0.0,
                     eval_every=900, seed=0, progress=False)
trainer = train_two_stage(model, task_batches(splits.train, 32, SEQ_LEN), config, stage2_steps=200)
last = trainer.history[-1]
print("exit mass per step:", [round(last[f"mass_{t}"], 3) for t in range(1, 5)], " E[t]", round(last["depth"], 2))
print("teacher-forced test accuracy per step:", [round(a, 3) for a in task_accuracy(model, splits.test).tolist()])

# %% [markdown]
# The model generates answers now. Greedy decoding of a few test prompts, with the exact
# cache and Ouro's Q-exit at $q = 0.5$, showing the steps each new token used:

# %%
examples = splits.test[:6]
res = generate(model, [TASK_VOCAB.encode(e.prompt) for e in examples], 8, stop_tokens=[TASK_VOCAB.eos_id],
               exit_rule=make_exit_rule("q_exit", 0.5))
for e, new, steps in zip(examples, res.new_tokens.tolist(), res.steps.tolist()):
    kept = [(t, s) for t, s in zip(new, steps) if s > 0]
    print(f"{e.prompt:12s} -> {TASK_VOCAB.decode([t for t, _ in kept]):8s} (answer {e.answer + '.':8s}) "
          f"steps {[s for _, s in kept]}")

# %% [markdown]
# ### The benchmark
#
# `bench_decode(model, examples, settings)` decodes every held-out example under each
# (cache strategy, exit rule) setting and reports:
#
# - **KiB**: the KV cache of one batch of `batch_size` prompts, counted from its tensors;
# - **accuracy**: exact match of the generated answers (greedy, stopped at `.`);
# - **steps/token**: the mean loop steps of the generated tokens;
# - **tok/s**: tokens per second of the **decoding phase** (the prefill always runs every step,
#   so it is timed apart), at batch size 1 and at `batch_size`, the median of `repeats` turns;
# - **speedup** of each exit rule against full-depth decoding with the same cache, beside the
#   **ideal** $S / \bar s$, with $\bar s$ the mean steps of the decoded tokens.
#
# It goes to `looplm/bench.py` as `python -m looplm.bench decode`, which trains a small model
# first unless given `--checkpoint`.

# %% [markdown]
# The cells marked `#| export bench` extend chapter 4's `looplm/bench.py`, whose registry
# `BENCHMARKS` maps a name to (help, add_arguments, run). In this notebook we import it, so the
# registration below runs here too.

# %%
from looplm.bench import BENCHMARKS

# %%
#| export bench
import math
import statistics as _statistics

from looplm.checkpoints import load_model_flag
from looplm.data import TASK_VOCAB, TASKS, decode_answer, make_splits, make_task
from looplm.exits import make_exit_rule
from looplm.generate import generate
from looplm.train import TrainConfig, task_batches, train_two_stage

# (cache strategy, exit rule name or None): each rule at its default threshold
DECODE_SETTINGS = (("exact", None), ("last", None), ("first", None), ("average", None), ("mod-2", None),
                   ("exact", "q_exit"), ("exact", "confidence"), ("exact", "kl"), ("exact", "hidden_change"),
                   ("exact", "fixed"), ("last", "q_exit"))


def _decode_rule(name):
    if name is None:
        return None
    return make_exit_rule(name)                                # at its default threshold


def _decode(model, cache, rule, batch, max_new, vocab):
    return generate(model, batch, max_new, cache=cache, exit_rule=rule, stop_tokens=[vocab.eos_id],
                    pad_id=vocab.pad_id)


@torch.no_grad()
def decode_quality(model, examples, settings=DECODE_SETTINGS, batch_size=64, vocab=TASK_VOCAB):
    """Greedy decoding of `examples` under each (cache, exit rule) setting, untimed. -> one dict per
    setting: cache, rule, kib (one batch's cache), accuracy (exact match of the answers), steps
    (mean loop steps of the generated tokens) and decode_steps (the same without the first token,
    which the exact prefill reads out)."""
    model.eval()
    prompts = [vocab.encode(e.prompt) for e in examples]
    max_new = max(len(e.answer) for e in examples) + 1
    rows = []
    for cache, rule_name in settings:
        rule = _decode_rule(rule_name)
        answers, steps, decoded, kib = [], [], [], None
        for start in range(0, len(prompts), batch_size):
            res = _decode(model, cache, rule, prompts[start:start + batch_size], max_new, vocab)
            kib = res.cache_bytes / 1024 if kib is None else kib
            answers += [decode_answer(row, vocab) for row in res.new_tokens]
            steps.append(res.steps[res.steps > 0])
            later = res.steps[:, 1:]
            decoded.append(later[later > 0])
        correct = [a == e.answer for a, e in zip(answers, examples)]
        decoded = torch.cat(decoded).float()
        rows.append({"cache": cache, "rule": rule_name or "none", "kib": kib,
                     "accuracy": sum(correct) / len(correct), "steps": torch.cat(steps).float().mean().item(),
                     "decode_steps": decoded.mean().item() if decoded.numel() else float("nan")})
    return rows


def bench_decode(model, examples, settings=DECODE_SETTINGS, batch_size=64, speed_examples=32, repeats=3,
                 vocab=TASK_VOCAB):
    """decode_quality, then the decoding speed of each setting at batch 1 and batch_size. -> dict
    with "rows" (one dict per setting) and "settings"."""
    prompts = [vocab.encode(e.prompt) for e in examples]
    max_new = max(len(e.answer) for e in examples) + 1
    n_steps = model.config.n_loops
    rows = [{**row, "seconds": {1: [], batch_size: []}, "tokens": {}}
            for row in decode_quality(model, examples, settings, batch_size, vocab)]

    def run(cache, rule, batch):
        return _decode(model, cache, rule, batch, max_new, vocab)

    for _ in range(repeats):                         # timed turns, the settings interleaved
        for row, (cache, rule_name) in zip(rows, settings):
            rule = _decode_rule(rule_name)
            for size in (1, batch_size):
                batches = ([[p] for p in prompts[:speed_examples]] if size == 1 else [prompts[:batch_size]])
                seconds, tokens = 0.0, 0
                for batch in batches:
                    res = run(cache, rule, batch)
                    seconds += res.seconds["decode"]
                    tokens += int((res.steps[:, 1:] > 0).sum())
                row["seconds"][size].append(seconds)
                row["tokens"][size] = tokens
    for row in rows:                                 # nan where no token was decoded after the first
        for size in (1, batch_size):
            tokens = row["tokens"][size]
            row[f"tok_s_{size}"] = tokens / _statistics.median(row["seconds"][size]) if tokens else float("nan")
    for row in rows:
        base = next((r for r in rows if r["cache"] == row["cache"] and r["rule"] == "none"), rows[0])
        row["ideal"] = n_steps / row["decode_steps"]
        for size in (1, batch_size):
            row[f"speedup_{size}"] = row[f"tok_s_{size}"] / base[f"tok_s_{size}"]
    settings_info = dict(n_examples=len(examples), batch_size=batch_size, speed_examples=speed_examples,
                         repeats=repeats, n_loops=n_steps, threads=torch.get_num_threads())
    return {"rows": rows, "settings": settings_info}


def format_decode_table(result):
    s = result["settings"]
    b = s["batch_size"]
    lines = [f"decoding {s['n_examples']} held-out examples, S = {s['n_loops']} steps, greedy; tok/s of the "
             f"decode phase at batch 1 ({s['speed_examples']} prompts) and batch {b}, median of {s['repeats']} "
             f"turns, {s['threads']} thread(s)",
             "",
             f"{'cache':8s} {'exit rule':14s} {'KiB':>7s} {'accuracy':>8s} {'steps/tok':>9s} {'tok/s@1':>8s} "
             f"{f'tok/s@{b}':>9s} {'speedup@1':>9s} {f'speedup@{b}':>10s} {'ideal':>6s}"]
    for r in result["rows"]:
        lines.append(f"{r['cache']:8s} {r['rule']:14s} {r['kib']:7.1f} {r['accuracy']:8.3f} {r['steps']:9.2f} "
                     f"{r['tok_s_1']:8.0f} {r[f'tok_s_{b}']:9.0f} {r['speedup_1']:9.2f} {r[f'speedup_{b}']:10.2f} "
                     f"{r['ideal']:6.2f}")
    if any(math.isnan(r["tok_s_1"]) or math.isnan(r[f"tok_s_{b}"]) for r in result["rows"]):
        lines += ["", "nan: no token was decoded after the first one (every answer ended at its first token), "
                      "so there was no decoding to time"]
    return "\n".join(lines)


def plot_decode(result, path):
    from matplotlib.figure import Figure

    rows, b = result["rows"], result["settings"]["batch_size"]
    labels = [f"{r['cache']} / {r['rule']}" for r in rows]
    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.barh(labels[::-1], [r["kib"] for r in rows][::-1], color="C0")
    ax1.set(xlabel=f"KV cache KiB (batch of {b})", title="memory")
    y = range(len(rows))
    ax2.barh([i + 0.2 for i in y], [r["speedup_1"] for r in rows][::-1], height=0.2, label="measured, batch 1")
    ax2.barh(list(y), [r[f"speedup_{b}"] for r in rows][::-1], height=0.2, label=f"measured, batch {b}")
    ax2.barh([i - 0.2 for i in y], [r["ideal"] for r in rows][::-1], height=0.2, label="ideal S / steps")
    ax2.set(yticks=list(y), yticklabels=labels[::-1], xlabel="decode speedup vs full depth, same cache",
            title="python -m looplm.bench decode")
    ax2.axvline(1.0, color="gray", linewidth=0.8)
    fig.legend(*ax2.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

# %% [markdown]
# The command line: with `--checkpoint` it measures a saved model (its task given by `--task`
# and `--difficulty`); without one it first trains a small gated model on the stack task
# with Ouro's two stages (`--train-steps`, a fifth of them Stage II). It checks its flags
# before it trains or reads anything: a count below 1, an unknown task, a checkpoint that is
# missing, unreadable or not a looplm checkpoint, or one whose model cannot hold the task's
# sequences each raise an error naming the flag (a `ValueError`, a `CheckpointError` or a
# `FileNotFoundError`), which `python -m looplm.bench` reports as one `error:` line.

# %%
#| export bench
def _decode_arguments(parser):
    parser.add_argument("--checkpoint", default=None, help="a saved model (default: train a small one first)")
    parser.add_argument("--task", default="stack", help="the chapter 0 task of the held-out examples (default stack)")
    parser.add_argument("--difficulty", type=int, default=4, help="difficulties 1..N (default 4)")
    parser.add_argument("--n-test", type=int, default=200, help="held-out examples (default 200)")
    parser.add_argument("--train-steps", type=int, default=400, help="updates when training first (default 400)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--speed-examples", type=int, default=16, help="prompts timed one at a time (default 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="build/bench/decode.png", help="plot (default build/bench/decode.png)")


def _decode_model_from_args(args):
    """The checked flags of `bench decode`: -> (task, the loaded model or None). Raises before any work."""
    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {args.task!r}")
    for flag, value in (("--difficulty", args.difficulty), ("--n-test", args.n_test),
                        ("--train-steps", args.train_steps), ("--batch-size", args.batch_size),
                        ("--speed-examples", args.speed_examples), ("--repeats", args.repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be an int >= 1, got {value!r}")
    task = make_task(args.task)
    if args.checkpoint is None:
        return task, None
    model = load_model_flag(args.checkpoint)
    if model.config.vocab_size < TASK_VOCAB.vocab_size:
        raise ValueError(f"--checkpoint: its model has vocab_size={model.config.vocab_size}, fewer ids than the "
                         f"task vocabulary's {TASK_VOCAB.vocab_size}: it was not trained on the chapter 0 tasks")
    return task, model


def _check_decode_context(args, model, examples):
    """ValueError naming --difficulty when the checkpoint's context cannot hold prompt + answer + end."""
    # bench_decode asks for the longest answer and its end token; all but the last are fed back
    needed = max(len(e.prompt) for e in examples) + max(len(e.answer) for e in examples)
    if model.config.max_seq_len < needed:
        raise ValueError(f"--difficulty {args.difficulty}: decoding the {args.task} examples up to that difficulty "
                         f"needs {needed} positions, and the model in --checkpoint holds max_seq_len="
                         f"{model.config.max_seq_len}; use a smaller --difficulty")


def _decode_command(args):
    task, model = _decode_model_from_args(args)
    torch.manual_seed(0)
    splits = make_splits(task, n_train=4000, n_test=args.n_test, max_difficulty=args.difficulty,
                         ood_max_difficulty=args.difficulty + 1, seed=0)
    if model is not None:
        _check_decode_context(args, model, splits.test)
    else:
        seq_len = task.max_seq_len(args.difficulty + 1)
        model = LoopLM(LoopLMConfig(vocab_size=TASK_VOCAB.vocab_size, d_model=64, n_heads=4, n_loops=4,
                                    exit_gate=True, max_seq_len=seq_len))
        config = TrainConfig(steps=args.train_steps, batch_size=32, lr=5e-3, min_lr=5e-4,
                             warmup_steps=min(50, args.train_steps // 10), weight_decay=0.0,
                             eval_every=args.train_steps, seed=0, progress=False)
        train_two_stage(model, task_batches(splits.train, 32, seq_len), config,
                        stage2_steps=max(1, args.train_steps // 5))
        print(f"trained a gated LoopLM for {args.train_steps} updates on {args.task} (difficulty <= {args.difficulty})")
    result = bench_decode(model, splits.test, batch_size=args.batch_size, speed_examples=args.speed_examples,
                          repeats=args.repeats)
    print(format_decode_table(result))
    print(f"\nsaved {plot_decode(result, args.out)}")
    return 0


BENCHMARKS["decode"] = ("KV-cache strategies and per-token early exit while decoding", _decode_arguments,
                        _decode_command)

# %% [markdown]
# The chapter's run, on the model trained above and all 300 held-out examples:

# %% tags=["timing"]
start = time.perf_counter()
decode_result = bench_decode(model, splits.test, batch_size=64, speed_examples=8, repeats=3)
print(format_decode_table(decode_result))
bench_seconds = time.perf_counter() - start

# %% tags=["timing"]
plot_path = plot_decode(decode_result, Path(tempfile.gettempdir()) / "looplm_decode.png")
from IPython.display import Image, display

display(Image(filename=plot_path))

# %% [markdown]
# How to read the table (the numbers are those of the stored run; the timings vary from run to
# run and machine to machine, the accuracies and steps do not):
#
# - **Memory.** With answers a few tokens long, the prompt dominates the cache, and the prompt
#   is always cached per step; the shared strategies save the decoded part only. Section 7.3's
#   demonstration shows the saving for long generations, where it approaches $S$-fold.
# - **Quality.** The exact cache at full depth scores 0.913 on the held-out examples. The
#   first-step cache is the worst of the shared ones (0.800), as in Ouro's Table 14; the last-step
#   and averaged caches lose less (0.880, 0.910). Q-exit at $q = 0.5$ scores 0.907 with 3.09 steps
#   per token, within a point of full depth; the rules that stop at about 2 steps
#   (confidence, fixed depth 2) lose about half the accuracy. The next section checks these
#   differences over three seeds.
# - **Speed.** A token that exits at step $e$ runs $e$ steps of the core instead of $S$, and its
#   row leaves the batch. When every row exits at the same step (the `fixed` rule), batched
#   decoding comes closest to the ideal $S / \bar s$: only the fixed costs per token
#   (embedding, sampling, Python) are not divided by the steps saved. When rows exit at
#   different steps, the batch keeps stepping until its slowest row has exited, and every one
#   of those steps pays a fixed cost per block however few rows remain (launching each
#   operation, in Python and in PyTorch), plus a gather of the remaining rows' cache entries
#   out of the batch. For a model this small those costs are a large part of a step, so the
#   speedup should stay below the ideal; the rules that read the gate or the logits also pay
#   for computing the gate and the rule's score at every step. In the stored run, Q-exit decoded
#   1.09 times as fast as full depth at batch 1 and 1.16 times at batch 64 (ideal 1.41). KL and
#   hidden-state change, which save little or no work, moved within the noise (1.06 and 0.90 at
#   batch 1), and fixed depth 2 ran 1.62 and 1.67 times as fast (ideal 2). These timings are
#   one run's, and noisy: the five full-depth rows, which do nearly the same work, spread over
#   17% (187 to 218 tokens per second at batch 1), so at this scale only large differences mean
#   something. The largest gains came where rows exit at about the same step: confidence (1.64
#   steps per token, ideal 2.23) ran 1.92 and 1.52 times as fast at batch 1 and 64, and fixed
#   depth 2 1.62 and 1.67 times.

# %% [markdown]
# ### Quality over three seeds
#
# The accuracies in the table come from one trained model, and one seed of a small model can
# move by several points. The accuracy and steps of every setting do not depend on the machine
# (the timings do), so they make a stored experiment (Appendix B): the model above, trained
# from three seeds, each decoding the 300 held-out examples under every setting. Seed 0 is the
# model trained above.

# %%
#| export experiments
import dataclasses

import torch

from looplm.adaptive import AdaptiveLoss
from looplm.bench import DECODE_SETTINGS, decode_quality
from looplm.data import TASK_VOCAB, make_splits, make_task
from looplm.model import LoopLM, LoopLMConfig
from looplm.results import Experiment, register
from looplm.train import TrainConfig, Trainer, task_accuracy, task_batches, train_two_stage

CH07_SPLITS = dict(task="stack", n_train=4000, n_test=300, max_difficulty=5, ood_max_difficulty=7, seed=0)


def _ch07_setup(seed, steps=900):
    task, splits = make_task("stack"), make_splits(**CH07_SPLITS)
    seq_len = task.max_seq_len(7)
    torch.manual_seed(seed)
    model = LoopLM(LoopLMConfig(TASK_VOCAB.vocab_size, 64, 4, n_loops=4, exit_gate=True, max_seq_len=seq_len))
    config = TrainConfig(steps=steps, batch_size=32, lr=5e-3, min_lr=5e-4, warmup_steps=50, weight_decay=0.0,
                         eval_every=steps, seed=seed, progress=False)
    return model, splits, task_batches(splits.train, 32, seq_len), config


def _ch07_run(seed):
    model, splits, batches, config = _ch07_setup(seed)
    trainer = train_two_stage(model, batches, config, stage2_steps=200)
    return {"rows": decode_quality(model, splits.test), "test_per_step": task_accuracy(model, splits.test).tolist(),
            "prefix": [row["loss"] for row in trainer.history[:20]]}


def _ch07_prefix(seed, n_steps):
    # train_two_stage's first updates: Stage I (700 of the 900) starts on the last step's loss
    model, _, batches, config = _ch07_setup(seed)
    trainer = Trainer(model, batches, dataclasses.replace(config, steps=700),
                      loss_fn=AdaptiveLoss("stage1", beta=0.1, last_weight=1.0))
    trainer.run(until=n_steps)
    return [row["loss"] for row in trainer.history]


CACHE_STRATEGIES_EXPERIMENT = register(Experiment(
    "cache-strategies", "07", "chapter 7: accuracy and steps of every cache strategy and exit rule while decoding",
    _ch07_run, _ch07_prefix))

# %% [markdown]
# Accuracy and steps per token, mean ± half-range over the seeds:

# %% tags=["nbval-check-output"]
from looplm.results import load_results, per_seed, summary

stored = load_results("cache-strategies")
print(stored["command"], "| seeds", stored["seeds"])
print(f"{'cache':8s} {'exit rule':14s} {'accuracy':>14s} {'steps/token':>13s}")
for i, (cache, rule) in enumerate(DECODE_SETTINGS):
    rows = [seed_rows[i] for seed_rows in per_seed(stored, "rows")]
    print(f"{cache:8s} {rule or 'none':14s} {summary([r['accuracy'] for r in rows]):14.3f} "
          f"{summary([r['steps'] for r in rows]):13.2f}")

# %% [markdown]
# What holds in every seed: the first-step cache is the worst of the shared ones, as in Ouro's
# Table 14 (0.780 ± 0.107 against 0.884 ± 0.127 for the exact cache; in each seed it is the
# lowest of the five caches at full depth). The last-step, averaged and mod-2 caches lose
# little (0.854, 0.874 and 0.862). Q-exit at $q = 0.5$ uses about 3.1 steps per token and stays
# within about one point of full depth in each seed; confidence and fixed depth 2 stop at about
# 2 steps and lose 38 and 39 points on average: on this task most answers need a third step.

# %% [markdown]
# The same benchmark runs from a shell as `python -m looplm.bench decode`: without
# `--checkpoint` it first trains a small gated model (`--train-steps`), and `--n-test`,
# `--repeats` and `--speed-examples` trade time for precision. It prints the table above and
# saves the plot.
#
# And the generation command line, on the trained model saved to a temporary folder. From a
# shell it is the `python -m looplm.generate` line printed first; here the same `main` runs in
# this process:

# %%
from looplm.generate import main as generate_main, save_model

with tempfile.TemporaryDirectory() as folder:
    checkpoint = save_model(Path(folder) / "stack.pt", model)
    argv = ["--checkpoint", str(checkpoint), "--prompt", "K12-3=", "--prompt", "K4-56-7=", "--cache", "last",
            "--exit-rule", "q_exit", "--exit-threshold", "0.5"]
    print("$ python -m looplm.generate", " ".join(argv).replace(folder, "DIR"))
    print("exit status:", generate_main(argv))

# %% [markdown]
# ## 7.10 Bad input gets a clear error
#
# Every argument is checked before any work is done, so a bad call leaves nothing behind: no
# cache is built and the command line writes no file.

# %% tags=["nbval-check-output"]
try:
    generate(model, [TASK_VOCAB.encode("K12-3=")], 8, cache="lastest")
except ValueError as error:
    print("ValueError:", error)

# %% [markdown]
# The tests hold the full battery: every argument of `generate`, every flag of
# `python -m looplm.generate` and of `python -m looplm.bench decode` (one `error:` line naming the
# flag, exit status 2), and models whose weights are not finite.

# %% [markdown]
# ## Summary
#
# `looplm.generate` (its `__init__.py` ends up near 590 lines with Appendix C's command line:
# the cache and its strategies, decoding with early exit, and the argument checks that keep a
# bad call from building a cache are one unit of work):
#
# | name | what it does |
# |---|---|
# | `generate(model, idx, max_new_tokens, *, temperature=0.0, top_k=None, stop_tokens=None, cache="exact", exit_rule=None, n_loops=None, pad_id=0, generator=None, record=False, exit_mode="skip", weighted_exit=False)` | prefill, then KV-cached decoding through the model's own `encode`, `step` and `readout`; batched prompts of any lengths (left-padded, per-row positions); per-token early exit that drops exited rows from the work; `generator` drives every random draw; logits in the model's precision; chapter 8's `exit_mode="select"` (every step runs, the rule picks the readout) and `weighted_exit` -> `GenerationResult` |
# | `GenerationResult` | `tokens` [B, T_prompt + new], `steps` [B, new] (from 1; 0 after a stop), `logits` [B, new, V], `prompt_lengths`, `cache_bytes`, `seconds`, `cache`; `new_tokens`, `sequences()` |
# | `cache_strategy(name)`, `CacheStrategy`, `CACHE_STRATEGIES` | `"exact"`, `"last"`, `"first"`, `"average"`, `"mod-K"`: how decoded tokens are cached (the prompt always per step) |
# | `LoopKVCache`, `LayerCache` | one entry per (block, step) for every block that runs at that step; `length`, `nbytes()`, `fill_deeper(rows, exit_step)` (the deepest-state fill rule) |
# | `choose_tokens(logits, temperature, top_k, generator)` | greedy, or tempered top-k sampling from max-shifted float64 logits (any temperature > 0 stays finite) |
# | `save_model(path, model)`, `load_model(path, model=None)` | checkpoints with the loop's config and the looplm version, atomic; `CheckpointError` on a mismatch, on weights that do not fit (naming the tensors) and on a file holding objects unpickling would call |
# | `main(argv)` | `python -m looplm.generate --checkpoint … --prompt …`; a bad flag: one `error:` line naming it, exit status 2 |
#
# `looplm/bench.py` gains `bench_decode`, `format_decode_table`, `plot_decode`,
# `DECODE_SETTINGS` and `python -m looplm.bench decode`.
#
# What we showed: cached decoding equals recomputing the full forward at every position
# (logits within 1e-5, identical tokens) for every model layout; batched decoding equals decoding
# alone; the cache length equals the tokens seen at every step; a rule that never fires is
# full-depth decoding, and with rules that fire each token is the readout of its exit step in a
# model whose cache is filled by the deepest-state rule, checked against a slow reference
# written without a cache, and so is every cache strategy. Decoding runs the model's own
# `encode`, `step` and `readout`, keeps a float64 model in float64, and draws every random
# number from the `generator` it is given. On the trained model, the memory-saving strategies
# cost some accuracy, the first-step cache most (0.780 against 0.884 for the exact cache over
# three seeds), as Ouro found. Early exit skipped real work: Q-exit at $q = 0.5$ ran about 3.1
# loop steps per token instead of 4 and stayed within a point of full depth. How much of that
# became speed is more than one run on a small model can say: in the stored run Q-exit decoded
# 1.09 and 1.16 times as fast as full depth at batch 1 and 64, against an ideal of 1.41, while
# fixed depth 2, where all rows exit together, ran 1.62 and 1.67 times as fast; timings of
# rows doing the same work spread by 17%. A batch steps until its slowest row has exited and
# pays fixed costs at every step, so mixed exits gain less than the steps they skip.

# %% [markdown]
# ## Exercises
#
# Each exercise is a module in `exercises/ch07/` with a function for you to write, plus a file
# of graded tests next to it. Open the module, read its docstring, and replace the
# `raise NotImplementedError(...)`. The reference solutions are in `exercises/solutions/ch07/`,
# to read after you have tried. Under each exercise are hints, folded away: open them one at a
# time, and only when you are stuck.

# %% [markdown]
# **Exercise 7.1: The bytes of each cache strategy** (`ex1_cache_bytes.py`). Write
# `cache_bytes(config, strategy, batch, prompt_len, n_new, n_steps=None, bytes_per_value=4)`,
# the formula of section 7.3 for prelude, core and coda blocks and every strategy. The tests
# compare it with the bytes of the cache `generate` builds.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# The cache holds one `LayerCache` per block, each with a prompt part $[C, B, n_h, T_p, h_s]$
# and a decoded part $[K, B, n_h, N, h_s]$, for keys and for values. Count $C$ and $K$ for a
# prelude block and for a core or coda block.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# A prelude block runs once per token: $C = 1$ and $K = 1$. A core or coda block runs at every
# step, and the prompt is always cached exactly: $C = S$, and $K$ is $S$ for `"exact"`,
# $\min(K, S)$ for `"mod-K"`, and 1 for `"last"`, `"first"` and `"average"`.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# In units of one position's keys and values in one block ($2 n_h h_s$ numbers):
# $n_{\text{prelude}} (T_p + N) + (n_{\text{core}} + n_{\text{coda}})(S\,T_p + K N)$, times
# `batch` and `bytes_per_value`. Read K with `re.fullmatch(r"mod-([0-9]+)", strategy)`, and
# refuse K = 0.
# ```

# %% [markdown]
# **Exercise 7.2: The deepest-state fill rule** (`ex2_deepest_fill.py`). Write
# `fill_deeper(entries, exit_steps)`: given each token's entries for every step and its exit
# step, copy the exit step's entry into every deeper step. The tests compare with a loop, and
# with the cache that `generate` fills while decoding with early exits.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Say it per entry: in row $b$, step $t$ (from 1) ends up holding the entry of step
# $\min(t, e_b)$, where $e_b$ is the row's exit step. One index tensor $[S, B]$ describes the
# whole copy.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# `torch.minimum(torch.arange(1, S + 1)[:, None], exit_steps[None, :]) - 1` is that index,
# counted from 0. What remains is to pick, along dimension 0, the entry it names.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# Reshape the index to $[S, B, 1, \dots]$, `expand_as(entries)`, and call
# `entries.gather(0, index)`: it returns a new tensor, so `entries` is left as it was. Check
# the shape of `exit_steps` and its range $[1, S]$ first.
# ```

# %% [markdown]
# **Exercise 7.3: How far is each shared cache from the exact one?**
# (`ex3_shared_cache_error.py`). Ouro's first-step cache lost most of its accuracy, and on our
# trained model it lost the most too; the last-step and averaged ones lost less. Look at the
# entries themselves. A decoded token that ran all $S$ steps has one exact entry per step, $E_1,
# \dots, E_S$, and a later token's step $t$ should read $E_t$; a strategy hands it whatever the
# token left in the slot that step $t$ reads. Write `shared_cache_error(entries, strategy)`, the
# relative squared error $\sum_t \lVert R_t - E_t \rVert^2 / \sum_t \lVert E_t \rVert^2$ of what
# the steps read, for every strategy. The tests compare your numbers, to a relative $10^{-9}$,
# with the slots that `generate` fills while decoding small untrained models, against the same
# token's entries in the exact cache. Then answer: which one-slot cache is closest to the exact
# one, and is that a fact about the model or about arithmetic? In an untrained model, which is
# closer, `"first"` or `"last"`, and why?

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Once the token has run every step, `"first"` holds $E_1$ (it is written at step 1 only),
# `"last"` holds $E_S$ (every step overwrites it), `"average"` the mean of $E_1, \dots, E_S$, and
# `"exact"` holds $E_t$ in slot $t$. Every step reads one slot.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# For `"mod-K"`, step $t$ reads and writes slot $(t - 1) \bmod K$. Once every step has run, the
# slot holds the entry of the last step that wrote it: the largest $u \le S$ with
# $u \equiv t \pmod K$. With $K \ge S$ that is $t$ itself, and with $K = 1$ it is $S$.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# For a single entry $c$ read by every step,
# $\sum_t \lVert c - E_t \rVert^2 = \sum_t \lVert \bar E - E_t \rVert^2 + S \lVert c - \bar E \rVert^2$,
# with $\bar E$ the mean: the average is the best single entry in any model, by arithmetic.
# Whether $E_1$ or $E_S$ lies farther from the mean is the model's doing: print
# $\lVert E_t - E_S \rVert / \lVert E_S \rVert$ for every $t$ on the tests' models and on the
# chapter's trained model, and remember where step 1's keys come from: the state $h_0$, which
# no step of the core has processed yet.
# ```

# %% [markdown]
# The next cell grades your versions. Run it again whenever you like; every test fails until
# you write the code.

# %%
from looplm.grade import grade

report = grade("ch07")
