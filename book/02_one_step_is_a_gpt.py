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
# # Chapter 2: One step is a GPT
#
# Chapter 1 built one transformer block. This chapter turns blocks into language models, two
# of them:
#
# - a **GPT**: an embedding, a stack of $L$ *different* blocks, a final norm and a linear head
#   that maps each position to logits over the vocabulary;
# - a **looped model** (`LoopLM`): the same parts, except that a *core* of blocks is applied
#   again and again with the same weights, and the head reads out a prediction after every
#   pass through the core.

# %% [markdown]
# The title is the chapter's main check. A looped model that runs its core once, where the
# core is the GPT's whole stack, *is* that GPT: same weights, same logits. Ouro
# {cite:p}`zhu2025ouro` writes its model as $F^{(t)} = \mathrm{lmhead} \circ (M^L)^t \circ \mathrm{emb}$:
# the $L$-layer stack $M^L$ applied $t$ times. With $t = 1$ that is a standard transformer.
# Everything a looped model adds (more steps, an input re-injection, an exit gate) is a change
# to this one equivalence, so we start by making it exact.

# %% [markdown]
# The plan:
#
# 1. a validated config and the GPT;
# 2. the loop in its simplest form, written around the GPT's own parts;
# 3. the looped model the package keeps: prelude, core and coda, as in Huginn
#    {cite:p}`geiping2025huginn`,
#    a readout after every step, per-step losses, and the hooks later chapters fill in;
# 4. `LoopLM.from_gpt`, and the check that one step is the GPT;
# 5. parameter accounting: what weight tying buys, in numbers and in a plot;
# 6. what an untrained loop does step by step;
# 7. clear errors for bad configs and bad inputs.
#
# The kept code goes to `looplm/model.py`.

# %% tags=["hide-input"]
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from looplm.block import NORM_STYLES, Block, RMSNorm, RotaryEmbedding, block_param_count
from looplm.data import IGNORE_INDEX, TASK_VOCAB, encode_examples, make_task
from looplm.testing import run_tests

_ = torch.manual_seed(0)
print("torch", torch.__version__)

# %% [markdown]
# The models in this chapter read the character vocabulary of chapter 0's tasks. It is small,
# which keeps every model here tiny and fast on a CPU:

# %% tags=["nbval-check-output"]
VOCAB_SIZE = TASK_VOCAB.vocab_size
print("vocabulary:", VOCAB_SIZE, "tokens")

# %% [markdown]
# The next cell names the module that this chapter's `#| export` cells go to, and the cell
# after it holds that module's imports.

# %%
#| default_exp model

# %% tags=["hide-input"]
#| export
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from looplm.block import NORM_STYLES, Block, RMSNorm, RotaryEmbedding, block_param_count, default_d_hidden
from looplm.checks import require_bool, require_choice, require_int, require_number
from looplm.data import IGNORE_INDEX

# %% [markdown]
# ## 2.1 A config that refuses bad values
#
# A model is described by a handful of numbers: vocabulary size, width, heads, depth. We keep
# them in a dataclass, as nanoGPT {cite:p}`karpathy2022nanogpt` does. Ours is *frozen* and
# *validated*. A wrong value fails
# when the config is made, with a message naming the field, the value and what is allowed,
# instead of surfacing later as a shape error deep inside attention. The checks are chapter 0's
# `looplm.checks`: `require_int`, `require_number`, `require_bool` and `require_choice`.

# %% [markdown]
# The GPT and the looped model share most of their fields: the vocabulary, the width, the
# heads, the block's settings, the rope tables and the initialisation. One function checks
# those for both configs. A head count must divide the width, and the head dimension must be
# even because rotary embeddings rotate pairs of coordinates (chapter 1, section 1.3). The
# vocabulary is capped at $2^{31} - 1$ because token ids may come as int32 tensors.

# %%
#| export
MAX_VOCAB_SIZE = 2**31 - 1   # token ids may arrive as int32 tensors


def _validate_common(cfg):
    """The checks GPTConfig and LoopLMConfig share."""
    require_int("vocab_size", cfg.vocab_size, 1, MAX_VOCAB_SIZE)
    require_int("d_model", cfg.d_model, 1)
    require_int("n_heads", cfg.n_heads, 1)
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"n_heads must divide d_model, got n_heads={cfg.n_heads} "
                         f"and d_model={cfg.d_model}")
    if (cfg.d_model // cfg.n_heads) % 2:
        raise ValueError(f"head_dim = d_model // n_heads = {cfg.d_model // cfg.n_heads} must be "
                         f"even for rotary embeddings (d_model={cfg.d_model}, n_heads={cfg.n_heads})")
    if cfg.d_hidden is not None:
        require_int("d_hidden", cfg.d_hidden, 1)
    require_int("max_seq_len", cfg.max_seq_len, 1)
    require_choice("norm_style", cfg.norm_style, NORM_STYLES)
    require_bool("tie_embeddings", cfg.tie_embeddings)
    require_number("rope_base", cfg.rope_base, 1, low_open=True)
    require_number("eps", cfg.eps, 0, low_open=True)
    require_number("init_std", cfg.init_std, 0, low_open=True)

# %% [markdown]
# A config can be valid field by field and still describe a model that no machine holds:
# `vocab_size=10**9` with `d_model=4096` is 16 TB of embedding. Rather than let the allocator
# fail with a message about bytes, a model estimates its size before building anything (its
# weights in float32, plus the rope tables) and refuses, naming the field that makes it large,
# when that exceeds the machine's memory.

# %%
#| export
def _physical_memory_bytes():
    """Total RAM of this machine, or None where the OS does not say (then nothing is checked)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_fits_in_memory(cfg, n_blocks, available=None):
    """ValueError, naming the largest part, when the float32 model would not fit in `available`
    bytes (default: this machine's RAM)."""
    d, hidden = cfg.d_model, cfg.d_hidden or default_d_hidden(cfg.d_model)
    kv = getattr(cfg, "kv_heads", cfg.n_heads) * cfg.head_dim                # k and v widths (chapter 8)
    if getattr(cfg, "mlp", "dense") != "dense":                               # experts (chapter 9)
        n_experts, _, d_expert = cfg.moe_shape
        hidden = (n_experts + cfg.n_shared_experts) * d_expert + n_experts // 3
    parts = {"vocab_size": cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2),
             "d_model": n_blocks * (2 * d * d + 2 * d * kv + 3 * d * hidden),
             "max_seq_len": cfg.max_seq_len * cfg.head_dim}             # cos and sin: 2 x T x hs/2
    needed = 4 * sum(parts.values())
    available = _physical_memory_bytes() if available is None else available
    if available is not None and needed > available:
        field = max(parts, key=parts.get)
        raise ValueError(f"{field}={getattr(cfg, field)} makes this model too large: its float32 weights "
                         f"and rope tables need {needed / 2**30:,.1f} GiB, and this machine has "
                         f"{available / 2**30:,.1f} GiB of memory; use a smaller {field}")

# %% [markdown]
# Now the GPT's config. Four fields are required: vocabulary size, width, heads and number of
# layers. The rest have defaults:
#
# - `d_hidden`: the SwiGLU hidden size. `None` means $\tfrac83 d$ rounded up to a multiple of 8
#   (chapter 1's default).
# - `norm_style`: where the block puts its norms, `"pre"`, `"sandwich"` (Ouro) or `"huginn"`.
# - `tie_embeddings`: the output head reuses the embedding matrix.
# - `init_std`: the standard deviation of every initial weight matrix.

# %%
#| export
@dataclass(frozen=True)
class GPTConfig:
    """A standard decoder-only transformer: embedding, n_layers distinct blocks, norm, head.

    Every field is validated when the config is made (ValueError naming the field). The config
    is frozen: make a variant with dataclasses.replace(cfg, n_layers=8), which validates again.
    """

    vocab_size: int
    d_model: int
    n_heads: int
    n_layers: int
    d_hidden: int | None = None  # SwiGLU hidden size; None: 8/3 d_model rounded up to a multiple of 8
    max_seq_len: int = 256       # the longest sequence the rope tables cover
    norm_style: str = "pre"      # "pre", "sandwich" (Ouro) or "huginn": see Block
    tie_embeddings: bool = True  # the LM head reuses the embedding matrix
    rope_base: float = 10000.0
    eps: float = 1e-6            # RMSNorm epsilon
    init_std: float = 0.02       # std of the normal init of every embedding and linear weight

    def __post_init__(self):
        _validate_common(self)
        require_int("n_layers", self.n_layers, 1)

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

# %% [markdown]
# A valid config prints as itself; an invalid one never gets made:

# %% tags=["nbval-check-output"]
print(GPTConfig(vocab_size=VOCAB_SIZE, d_model=64, n_heads=4, n_layers=2))
try:
    GPTConfig(vocab_size=VOCAB_SIZE, d_model=64, n_heads=5, n_layers=2)
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ## 2.2 The GPT
#
# For token ids $x_1, \dots, x_T$, the GPT embeds each token, runs the hidden states through
# $L$ blocks, normalises, and projects to the vocabulary:
#
# $$
# h_0 = E[x], \qquad h_l = \mathrm{block}_l(h_{l-1}) \;\; (l = 1, \dots, L), \qquad
# \text{logits} = W_{\text{head}}\, \mathrm{RMSNorm}(h_L).
# $$
#
# $E \in \mathbb{R}^{V \times d}$ is the embedding and $W_{\text{head}} \in \mathbb{R}^{V \times d}$
# the head. With tied embeddings $W_{\text{head}} = E$: the logit of token $v$ is the dot
# product of the final state with $v$'s own embedding.

# %% [markdown]
# Every block attends causally, so the logits at position $i$ depend on $x_1, \dots, x_i$
# only, and training on all positions at once teaches next-token prediction everywhere.
# There is no position embedding: rotary embeddings inside attention carry the positions.
# The rope tables are built once per model and handed to every block.

# %% [markdown]
# Token ids get checked before they reach the embedding. `nn.Embedding` would fail on an
# out-of-range id too, but with an index error that does not say which id or which range.
# The shape and dtype checks are free. The range check reads the values, which is free on the
# CPU but on a GPU makes the host wait for the device on every forward, so there the check
# is left to the embedding's own device-side assert.

# %%
#| export
def _check_token_ids(name, ids, vocab_size, max_seq_len):
    """Raise unless `ids` is an integer [B, T] tensor, T <= max_seq_len, ids in [0, vocab_size)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (torch.long), got dtype {ids.dtype}")
    if ids.ndim != 2 or ids.numel() == 0:
        raise ValueError(f"{name} must have shape [B, T] with B, T >= 1, got {list(ids.shape)}")
    if ids.shape[1] > max_seq_len:
        raise ValueError(f"{name} has T={ids.shape[1]} positions but max_seq_len={max_seq_len}")
    if ids.device.type != "cpu":
        return          # reading values would make the host wait for the GPU; the embedding checks them there
    low, high = ids.min().item(), ids.max().item()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} holds ids outside [0, vocab_size={vocab_size}): "
                         f"min {low}, max {high}")

# %% [markdown]
# Initialisation follows nanoGPT: every embedding and linear weight is drawn from
# $\mathcal{N}(0, 0.02^2)$, and the RMSNorm gains start at one. The head is tied *after* the
# draw, so a tied model's head is simply its embedding.

# %%
#| export
def _init_weights(modules, std):
    """Normal(0, std) for every Linear and Embedding weight inside `modules`; norm gains stay 1."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)

# %% [markdown]
# The model itself is short. The attribute names (`embed`, `rope`, `blocks`, `norm`,
# `lm_head`) matter later: `LoopLM.from_gpt` copies the weights by name.

# %%
#| export
class GPT(nn.Module):
    """A standard causal LM: embed -> n_layers distinct Blocks -> RMSNorm -> LM head.

    gpt(idx [B, T] integer ids) -> logits [B, T, vocab_size]. The rope tables are built once
    (self.rope) and shared by every block.
    """

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        _check_fits_in_memory(config, config.n_layers)
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.rope = RotaryEmbedding(c.head_dim, c.max_seq_len, c.rope_base)
        self.blocks = nn.ModuleList(Block(c.d_model, c.n_heads, c.d_hidden, c.norm_style, c.eps)
                                    for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        _init_weights([self.embed, self.blocks, self.lm_head], c.init_std)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # one matrix, used twice

    def forward(self, idx):
        c = self.config
        _check_token_ids("idx", idx, c.vocab_size, c.max_seq_len)
        cos, sin = self.rope(idx.shape[1])       # (T, hs/2) each
        h = self.embed(idx)                      # (B, T, D)
        for block in self.blocks:
            h = block(h, cos, sin)               # (B, T, D)
        return self.lm_head(self.norm(h))        # (B, T, V)

# %% [markdown]
# A two-layer GPT of width 64 on the task vocabulary:

# %% tags=["nbval-check-output"]
_ = torch.manual_seed(0)
gpt = GPT(GPTConfig(vocab_size=VOCAB_SIZE, d_model=64, n_heads=4, n_layers=2))
idx = torch.randint(0, VOCAB_SIZE, (3, 10))      # (B, T)
logits = gpt(idx)
print("idx", tuple(idx.shape), "-> logits", tuple(logits.shape))
print("parameters:", sum(p.numel() for p in gpt.parameters()))

# %% [markdown]
# An untrained model should be close to uniform over the vocabulary: its small initial weights
# give small logits. Its cross-entropy should then be near $\ln V$:

# %%
loss = F.cross_entropy(logits.flatten(0, 1), torch.randint(0, VOCAB_SIZE, (30,)))
print(f"loss at init {loss.item():.2f}, ln V = {math.log(VOCAB_SIZE):.2f}")

# %% [markdown]
# ## 2.3 From a stack to a loop
#
# A looped model replaces the stack of distinct blocks with **one function applied
# repeatedly**. Call the state after step $t$ $h_t$ and the looped function $f_\theta$:
#
# $$h_t = f_\theta(h_{t-1}), \qquad t = 1, \dots, S .$$
#
# The parameters $\theta$ carry no index $t$: every step uses the same weights. The step
# count $S$ (`n_loops`) is a choice made at run time, not a property of the weights.

# %% [markdown]
# After every step the model can make a prediction, by applying the same final norm and head
# that the GPT applies once:
#
# $$\text{logits}_t = W_{\text{head}}\, \mathrm{RMSNorm}(h_t), \qquad t = 1, \dots, S .$$
#
# Ouro trains on all of these readouts at once and learns which one to use per token (chapter
# 5). For now we simply compute all $S$ of them.

# %% [markdown]
# Here is the idea in its simplest form, written around the GPT's own parts. Ouro's choice is
# $f_\theta$ = the GPT's whole stack of blocks:

# %%
def loop_gpt_stack(gpt, idx, n_loops):
    """Apply gpt's whole stack n_loops times; read out logits after every pass -> [S, B, T, V]."""
    cos, sin = gpt.rope(idx.shape[1])
    h = gpt.embed(idx)                                   # h_0: (B, T, D)
    logits = []
    for _ in range(n_loops):
        for block in gpt.blocks:                         # f_theta: the same blocks every step
            h = block(h, cos, sin)
        logits.append(gpt.lm_head(gpt.norm(h)))          # (B, T, V)
    return torch.stack(logits)                           # (S, B, T, V)

# %% [markdown]
# Three steps give three slices of logits, and the first is exactly the GPT's output: the same
# operations on the same numbers.

# %% tags=["nbval-check-output"]
with torch.no_grad():
    looped = loop_gpt_stack(gpt, idx, n_loops=3)
    print("per-step logits", tuple(looped.shape))
    print("step 1 equals the GPT exactly:", torch.equal(looped[0], gpt(idx)))

# %% [markdown]
# The later slices are different predictions from the same weights, computed with more depth.
# An untrained GPT never saw its stack applied to its own output, so they mean little yet;
# training a model to use them is what the next chapters do.

# %% [markdown]
# ### Prelude, core, coda
#
# Looping the whole stack is one choice. Huginn splits the model into three parts: a
# **prelude** $P$ that runs once and embeds the input, a **core** $R$ that loops, and a
# **coda** $C$ that runs once at the end. Huginn's shape is (2, 4, 2): 2 prelude layers,
# a 4-layer core looped 32 times on average, 2 coda layers.

# %% [markdown]
# Our `LoopLM` has all three, with sizes `n_prelude`, `n_core` and `n_coda` counted in blocks:
#
# $$
# x_0 = P(E[x]), \qquad h_0 = \mathrm{init}(x_0), \qquad
# h_t = R\big(\mathrm{inject}(h_{t-1}, x_0)\big), \qquad
# \text{logits}_t = W_{\text{head}}\, \mathrm{RMSNorm}\big(C(h_t)\big).
# $$
#
# Ouro's setting is `n_prelude = n_coda = 0` with the whole stack as the core.

# %% [markdown]
# Two details of that recurrence:
#
# - **The readout of step $t$ is** $\mathrm{coda}(h_t)$, then the final norm, then the head.
#   The coda runs on a side branch, once per readout; its output is not fed back. Huginn runs
#   its coda only after the last step. We read out every step, so the coda runs every step.
# - **The effective depth** of an $S$-step run is the number of blocks a token passes through
#   on its way to the last readout: $n_{\text{prelude}} + n_{\text{core}} \cdot S + n_{\text{coda}}$.

# %% [markdown]
# The readout's norm is a side branch too: the next step continues from $h_t$, not from
# $\mathrm{RMSNorm}(h_t)$. Ouro's code normalises inside the loop and feeds the normed state
# to the next step. Chapter 1 showed why some renormalisation of the stream matters when one
# block runs many times. With `norm_style="huginn"` every block already ends in a norm. The
# chapter on real looped models adds Ouro's normed feedback as an option and compares it with
# the raw state.

# %% [markdown]
# ### Extension points
#
# The recurrence has two slots this chapter fills with the simplest choice:
#
# - $\mathrm{inject}(h, x_0)$, **input injection**. Ouro has none: the core sees only its
#   previous output. Chapter 3 adds `"add"` ($h + \mathrm{RMSNorm}(x_0)$, as in
#   {cite:t}`yang2024looped` and TRM {cite:p}`jolicoeurmartineau2025trm`) and `"concat"`
#   (Huginn's adapter $A: \mathbb{R}^{2d} \to \mathbb{R}^d$ on $[h, x_0]$).
# - $\mathrm{init}(x_0)$, **the initial state** $h_0$. A GPT starts from the embedding, so we do
#   too. Chapter 3 adds `"zeros"` (as in Yang et al.) and `"random"` (Huginn's random start,
#   $h_0 \sim \mathcal{N}(0, \sigma^2 I)$, truncated).

# %% [markdown]
# Each slot is a **registry**: a module-level dict from a name to a factory `(config) ->
# nn.Module`. The config names the entry (`injection="none"`, `init_state="embedding"`),
# validation checks the name against the registry, and the model builds the module. A later
# chapter adds an entry with one line in its own exported cell, and nothing here changes.
# The two entries of this chapter:

# %%
#| export
class NoInjection(nn.Module):
    """injection="none": the core sees only its previous output, inject(h, x0) = h (Ouro)."""

    def __init__(self, config):
        super().__init__()

    def forward(self, h, x0):
        return h


class EmbeddingInit(nn.Module):
    """init_state="embedding": the loop starts from the prelude's output, h_0 = x0 (as a GPT does)."""

    def __init__(self, config):
        super().__init__()

    def forward(self, x0, generator=None):
        return x0

# %% [markdown]
# The contract for an entry, which the later chapters follow:
#
# | registry | factory | module's `forward` |
# |---|---|---|
# | `INJECTIONS` | `(config) -> nn.Module` | `(h [B, T, D], x0 [B, T, D]) -> [B, T, D]`, applied before the core at every step |
# | `INIT_STATES` | `(config) -> nn.Module` | `(x0 [B, T, D], generator=None) -> h_0 [B, T, D]`, once per forward; a random state draws from `generator` |
# | `EXIT_GATES` | `(config) -> nn.Module` | `(z [B, T, D]) -> λ_t [B, T]` in $(0, 1)$ at every step, plus `exit_probs(gate [S, B, T]) -> [S, B, T]` |

# %% [markdown]
# The third registry is for the **exit gate**, which arrives in chapter 5. Ouro's gate reads
# the normed state $z_t = \mathrm{RMSNorm}(\cdot)$ that the head reads, and outputs one
# probability $\lambda_t$ per token per step: the chance of stopping there. The model stacks
# the steps into `out.gate` $[S, B, T]$, and the gate module turns them into the exit
# distribution `out.exit_probs`. Here the registry starts empty.

# %%
#| export
INJECTIONS = {"none": NoInjection}          # chapter 3 adds "add" and "concat"
INIT_STATES = {"embedding": EmbeddingInit}  # chapter 3 adds "zeros" and "random"
EXIT_GATES = {}                             # chapter 5 adds "linear", Ouro's gate
ATTENTIONS = {}                             # chapter 8 adds "grouped", grouped-query attention
MLPS = {}                                   # chapter 9 adds "moe", a mixture of experts
CONFIG_CHECKS = {}                          # chapters 8-10 add the checks of their config fields
KERNEL_BACKENDS = {}                        # chapter 10 adds "triton": the same model on fused kernels

# %% [markdown]
# Each module of this chapter is an identity with no parameters, so the defaults leave the
# looped model exactly a stack of blocks:

# %% tags=["nbval-check-output"]
h, x0 = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
print("inject(h, x0) is h:", INJECTIONS["none"](None)(h, x0) is h)
print("init(x0) is x0:", INIT_STATES["embedding"](None)(x0) is x0)

# %% [markdown]
# ## 2.4 The looped model's config
#
# `LoopLMConfig` has the GPT's shared fields, plus the loop's own:
#
# - `n_prelude`, `n_core`, `n_coda`: blocks in each part (0, 1, 0 by default);
# - `n_loops`: the default step count $S$ (4, Ouro's $T_{\max}$); `model(idx, n_loops=k)`
#   overrides it;
# - `injection`, `init_state`: names in the registries above;
# - `exit_gate`: whether to build a gate, and `gate_head`, which entry of `EXIT_GATES` to use.

# %% [markdown]
# The exit gate gets its own check. Asking for a gate before any is registered raises an error
# that says so, rather than running without one: an experiment that asks for adaptive depth
# must never silently get fixed depth.

# %%
#| export
def _validate_exit_gate(cfg):
    require_bool("exit_gate", cfg.exit_gate)
    if not isinstance(cfg.gate_head, str):
        raise ValueError(f"gate_head must be a str naming an entry of EXIT_GATES, got {cfg.gate_head!r}")
    if not cfg.exit_gate:
        return
    if not EXIT_GATES:
        raise ValueError("exit_gate=True, but no exit gate is available yet: EXIT_GATES is empty "
                         "until chapter 5 (adaptive depth) registers one; use exit_gate=False")
    require_choice("gate_head", cfg.gate_head, tuple(EXIT_GATES))

# %% [markdown]
# The fields after `init_std` serve published models (chapter 8), a mixture of experts
# (chapter 9) and Triton kernels (chapter 10). Their defaults change nothing, and those chapters
# check them: each adds its check to the registry `CONFIG_CHECKS`, which `__post_init__` runs.
#
# The config also knows its effective depth, $n_{\text{prelude}} + n_{\text{core}} \cdot S + n_{\text{coda}}$:

# %%
#| export
@dataclass(frozen=True)
class LoopLMConfig:
    """A looped LM: embed -> prelude (once) -> core (n_loops times, shared weights) -> readout.

    The readout after every step is coda (n_coda blocks) -> RMSNorm -> LM head. Every field is
    validated when the config is made (ValueError naming the field, the value and what is
    allowed). Frozen: use dataclasses.replace(cfg, n_loops=8) for a variant.
    """

    vocab_size: int
    d_model: int
    n_heads: int
    n_prelude: int = 0           # blocks run once before the loop
    n_core: int = 1              # blocks in the looped core
    n_coda: int = 0              # blocks run once per readout, after the loop state
    n_loops: int = 4             # loop steps S (model(idx, n_loops=k) overrides it)
    exit_gate: bool = False      # build an exit gate (chapter 5) from EXIT_GATES[gate_head]
    injection: str = "none"      # a key of INJECTIONS: how x0 re-enters the loop at every step
    init_state: str = "embedding"  # a key of INIT_STATES: how h_0 is made from x0
    gate_head: str = "linear"    # a key of EXIT_GATES, used when exit_gate=True
    d_hidden: int | None = None  # SwiGLU hidden size; None: 8/3 d_model rounded up to a multiple of 8
    max_seq_len: int = 256
    norm_style: str = "pre"      # "pre", "sandwich" (Ouro) or "huginn": see Block
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    eps: float = 1e-6
    init_std: float = 0.02
    # the options published models need (chapter 8); the defaults change nothing
    n_kv_heads: int | None = None    # key/value heads (grouped-query attention); None: n_heads
    qk_bias: bool = False            # a learned bias on q and k before rope (Huginn)
    embed_scale: float = 1.0         # the embedding is multiplied by it (Huginn: sqrt(d_model))
    feedback_norm: bool = False      # every step ends with the final norm, fed back (Ouro)
    norm_before_coda: bool = False   # the final norm also runs before the coda (Huginn)
    init_state_std: float = math.sqrt(2 / 5)   # σ of init_state="random" (chapter 3)
    # a mixture of experts in place of every block's MLP (chapter 9); "dense" refuses the rest
    mlp: str = "dense"               # "dense" (SwiGLU) or a key of MLPS ("moe")
    n_experts: int | None = None     # experts per block (default 8)
    top_k: int | None = None         # experts each token uses per block (default 2)
    d_expert: int | None = None      # an expert's hidden size (default: d_hidden split over top_k)
    n_shared_experts: int = 0        # experts every token uses, besides the routed ones
    router: str = "softmax"          # "softmax" or "sigmoid"
    capacity_factor: float | None = None   # None: dropless; else each expert takes at most
                                     # ceil(capacity_factor * tokens * top_k / n_experts)
    balance: str = "switch"          # "switch", "entropy", "bias" or "none"
    balance_pool: str = "all"        # "all": every step's tokens together; "step": per step
    z_loss: float = 0.0              # weight of the router z-loss in out.aux_loss
    bias_rate: float = 1e-3          # γ of balance="bias"
    kernels: str = "torch"           # "torch", or "triton": fused Triton kernels (chapter 10)

    def __post_init__(self):
        _validate_common(self)
        for check in CONFIG_CHECKS.values():      # the fields of chapters 8 to 10
            check(self)
        require_int("n_prelude", self.n_prelude, 0)
        require_int("n_core", self.n_core, 1)
        require_int("n_coda", self.n_coda, 0)
        require_int("n_loops", self.n_loops, 1)
        require_choice("injection", self.injection, tuple(INJECTIONS))
        require_choice("init_state", self.init_state, tuple(INIT_STATES))
        _validate_exit_gate(self)

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @property
    def kv_heads(self):
        """Key/value heads: n_kv_heads, or n_heads when it is None."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def moe_shape(self):
        """(n_experts, top_k, d_expert) with their defaults filled in (chapter 9): 8 experts, 2 per
        token, each d_hidden / top_k wide (rounded up), so that a token's active MLP weights are
        as many as a dense block's."""
        n_experts = 8 if self.n_experts is None else self.n_experts
        top_k = 2 if self.top_k is None else self.top_k
        return n_experts, top_k, self.d_expert or -(-(self.d_hidden or default_d_hidden(self.d_model)) // top_k)

    @property
    def grouped_attention(self):
        """True when the blocks need chapter 8's attention (fewer kv heads, or a q/k bias)."""
        return self.kv_heads != self.n_heads or self.qk_bias

    def effective_depth(self, n_loops=None):
        """Blocks on the path to the last readout: n_prelude + n_core * n_loops + n_coda."""
        n_loops = self.n_loops if n_loops is None else n_loops
        require_int("n_loops", n_loops, 1)
        return self.n_prelude + self.n_core * n_loops + self.n_coda

# %% [markdown]
# Huginn's (2, 4, 2) shape, scaled down to width 64, with 8 steps:

# %% tags=["nbval-check-output"]
cfg = LoopLMConfig(vocab_size=VOCAB_SIZE, d_model=64, n_heads=4,
                   n_prelude=2, n_core=4, n_coda=2, n_loops=8)
print("effective depth:", cfg.effective_depth(), "blocks")
print("with 32 steps:  ", cfg.effective_depth(32), "blocks")

# %% [markdown]
# ## 2.5 The output record and per-step losses
#
# A looped model returns more than logits, so its forward returns a small record. Every field
# but `logits` is `None` unless asked for:
#
# | field | shape | when |
# |---|---|---|
# | `logits` | $[S, B, T, V]$ | always: the readout after each step |
# | `gate` | $[S, B, T]$ | with an exit gate |
# | `exit_probs` | $[S, B, T]$ | with an exit gate: $p(t \mid x)$, sums to 1 over steps |
# | `step_losses` | $[S, B, T]$ | with `targets`: per-token cross-entropy of each step |
# | `loss` | scalar | with `targets`: the last step's mean over the learned tokens |
# | `hidden` | $[S, B, T, D]$ | with `return_hidden=True`: the states $h_1, \dots, h_S$ |
# | `weighted_logits` | $[B, T, V]$ | with an exit gate: $\sum_t p(t \mid x)\,\text{logits}_t$, Ouro's `use_weighted_exit` (chapter 8) |
# | `aux_loss`, `expert_load` | scalar, $[S, E]$ | with a mixture of experts (chapter 9): its balancing loss, and each step's load per expert |
#
# Steps are counted from 1 in prose; the first dimension indexes them from 0.

# %%
#| export
@dataclass
class LoopOutput:
    """What LoopLM.forward returns. S is the number of loop steps that ran."""

    logits: torch.Tensor                     # [S, B, T, V] readout after each step
    gate: torch.Tensor | None = None         # [S, B, T] exit gate λ_t in (0, 1), with a gate
    exit_probs: torch.Tensor | None = None   # [S, B, T] p(t | x), sums to 1 over S, with a gate
    step_losses: torch.Tensor | None = None  # [S, B, T] per-token CE per step, 0 where ignored
    loss: torch.Tensor | None = None         # scalar: mean of step_losses[-1] over learned tokens
    hidden: torch.Tensor | None = None       # [S, B, T, D] loop states h_1..h_S (return_hidden)
    weighted_logits: torch.Tensor | None = None   # [B, T, V] Σ_t p(t | x) logits_t, with a gate
    aux_loss: torch.Tensor | None = None     # scalar: the experts' balancing loss (chapter 9), MoE only
    expert_load: torch.Tensor | None = None  # [S, E] share of each step's routed assignments per expert

# %% [markdown]
# The per-step losses are the cross-entropy of every step's prediction at every position.
# Chapter 0's batches mark the positions that are not learned (the prompt, the padding) with
# target `IGNORE_INDEX` $= -100$. With $y_{b,i}$ the target at position $i$ of row $b$ and
# $\pi_t$ the next-token distribution read out at step $t$ (the softmax of its logits):
#
# $$
# \ell_{t,b,i} = \begin{cases} -\log \pi_t(y_{b,i} \mid x_{b,\le i}) & y_{b,i} \ne -100 \\
# 0 & \text{otherwise,} \end{cases}
# \qquad
# L_t = \frac{1}{|\mathcal{M}|} \sum_{(b,i) \in \mathcal{M}} \ell_{t,b,i},
# $$
#
# where $\mathcal{M}$ is the set of learned positions.

# %% [markdown]
# `F.cross_entropy` with `reduction="none"` computes $\ell$, already zero at ignored targets.
# One call covers all steps at once: the targets are the same for every step, so we broadcast
# them over the step dimension. The logits go to float32 first (unless they are float64), since
# the log-softmax of low-precision logits loses digits.

# %%
#| export
def token_losses(logits, targets):
    """Per-token cross-entropy: logits [..., B, T, V], targets [B, T] -> [..., B, T].

    Positions whose target is IGNORE_INDEX get loss 0. Computed in float32 (float64 logits:
    in float64).
    """
    lead = logits.shape[:-3]                                  # e.g. (S,)
    targets = targets.long().expand(*lead, *targets.shape)    # (..., B, T)
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = F.cross_entropy(wide.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(targets.shape)                         # (..., B, T)

# %% [markdown]
# Targets get the same scrutiny as the inputs: the same shape as `idx`, integer ids in range
# or `IGNORE_INDEX`, and at least one position to learn. A batch whose targets are all ignored
# would give a loss of $0/0$.

# %%
#| export
def _check_targets(targets, idx, vocab_size):
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an integer tensor (torch.long), got dtype {targets.dtype}")
    if targets.shape != idx.shape:
        raise ValueError(f"targets must have the shape of idx {list(idx.shape)}, "
                         f"got {list(targets.shape)}")
    if targets.device.type != "cpu":
        return          # as for idx: no host-device sync; cross_entropy checks the ids on the GPU
    learned = targets != IGNORE_INDEX
    if not learned.any():
        raise ValueError(f"targets has no position to learn: every entry is IGNORE_INDEX={IGNORE_INDEX}")
    bad = learned & ((targets < 0) | (targets >= vocab_size))
    if bad.any():
        raise ValueError(f"targets holds ids outside [0, vocab_size={vocab_size}) other than "
                         f"IGNORE_INDEX={IGNORE_INDEX}, e.g. {targets[bad][0].item()}")

# %% [markdown]
# ## 2.6 The looped model
#
# `LoopLM` has the GPT's parts with the blocks split three ways, plus the modules from the
# registries. Its forward pass is three small methods, one per line of the recurrence, so that
# later chapters can call them one at a time (a decoder with a KV cache, for instance, runs
# them a few positions at a time):
#
# - `encode(idx, cos, sin)` $\to x_0 = P(E[x])$;
# - `step(h, x0, cos, sin)` $\to h_t = R(\mathrm{inject}(h_{t-1}, x_0))$;
# - `readout(h, cos, sin)` $\to (\text{logits}_t, z_t)$ with $z_t = \mathrm{RMSNorm}(C(h_t))$,
#   the normed state that the head and the gate read.
#
# Each takes an optional `attend` hook, `attend(i)` giving the attention operation of its
# block `i` (chapter 1's `Block` accepts one), and `readout` a `last_only` flag. Chapter 7's
# decoder uses them to run the very same step through a KV cache, so that there is one
# definition of a loop step for training and for decoding.

# %% [markdown]
# The figure unrolls a forward pass of $S = 4$ steps. Read the top row from left to right:
# `encode` (embedding and prelude) runs once, and its output $x_0$ goes up to the purple line
# and is handed to every step's injection. Each step is `step` (inject, then the core), and
# the state $h_t$ takes two ways: on to the next step, and down into that step's `readout`
# (coda, final norm, then the head and the gate, which chapter 5 adds). Colour stands for
# weights: the four core boxes are one core, and the four readouts share one coda, one norm,
# one head and one gate.

# %% tags=["hide-input"]
from matplotlib.colors import to_rgba
from matplotlib.patches import FancyBboxPatch

PART_COLOURS = {"embed": "0.55", "prelude": "C4", "core": "C0", "coda": "C1", "norm": "0.55", "head": "C2",
                "gate": "C3"}


def draw_box(ax, x, y, text, part, width, height=0.8):
    """A rounded box centred at (x, y), filled with the light colour of `part`."""
    colour = PART_COLOURS[part]
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, linewidth=1.3,
                                boxstyle="round,pad=0,rounding_size=0.2", edgecolor=colour,
                                facecolor=to_rgba(colour, 0.18)))
    ax.text(x, y, text, ha="center", va="center", fontsize=9)


def draw_arrow(ax, start, end, colour="0.25"):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color=colour, linewidth=1.1,
                                                          shrinkA=0, shrinkB=0, mutation_scale=10))


def draw_unrolled_loop(S):
    """The looped model's forward pass, unrolled over S steps, as a diagram."""
    main_y, bus_y = 6.2, 7.5                     # the loop state's row, and the x0 line above it
    coda_y, norm_y, out_y, value_y = 4.8, 3.7, 2.5, 1.75
    step_x = [8.9 + 3.7 * i for i in range(S)]    # centre of each copy of the core
    fig, ax = plt.subplots(figsize=(10, 4.0))
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1)

    ax.text(0.35, main_y, "tokens", ha="center", va="center", fontsize=9)
    draw_box(ax, 1.95, main_y, "embed E", "embed", width=1.5)
    draw_box(ax, 3.95, main_y, "prelude P", "prelude", width=1.7)
    draw_box(ax, 5.95, main_y, "init", "embed", width=1.0)
    draw_arrow(ax, (0.85, main_y), (1.2, main_y))
    draw_arrow(ax, (2.7, main_y), (3.1, main_y))
    draw_arrow(ax, (4.8, main_y), (5.45, main_y))
    ax.plot([5.1, 5.1], [main_y, bus_y], color="C4", linewidth=1.3)      # x0 goes up to the line
    ax.text(5.2, bus_y + 0.15, "$x_0$ to every step", color="C4", ha="left", va="bottom", fontsize=9)
    ax.plot([5.1, step_x[-1] - 1.45], [bus_y, bus_y], color="C4", linewidth=1.3)
    ax.text(6.75, main_y + 0.15, "$h_0$", ha="center", va="bottom", fontsize=10)

    previous = 6.45                                                     # where the previous state leaves
    for t, x in enumerate(step_x, start=1):
        inject, branch = x - 1.45, x + 1.35
        ax.text(x, bus_y + 0.85, f"step $t = {t}$", ha="center", va="center", fontsize=10)
        draw_arrow(ax, (previous, main_y), (inject - 0.25, main_y))
        ax.plot(inject, main_y, "o", markersize=13, markerfacecolor="white", markeredgecolor="C4",
                markeredgewidth=1.3)
        ax.text(inject, main_y, "+", ha="center", va="center", fontsize=10, color="C4")
        draw_arrow(ax, (inject, bus_y), (inject, main_y + 0.3), colour="C4")
        if t == 1:
            ax.text(inject, main_y - 0.35, "inject", color="C4", ha="center", va="top", fontsize=8)
        draw_arrow(ax, (inject + 0.25, main_y), (x - 0.8, main_y))
        draw_box(ax, x, main_y, "core R", "core", width=1.6)
        # h_t goes on to the next step, and down a side branch to this step's readout
        ax.plot([x + 0.8, branch], [main_y, main_y], color="0.25", linewidth=1.1)
        ax.text(branch - 0.3, main_y + 0.15, f"$h_{t}$", ha="center", va="bottom", fontsize=10)
        draw_arrow(ax, (branch, main_y), (branch, coda_y + 0.4))
        draw_box(ax, branch, coda_y, "coda C", "coda", width=1.5, height=0.7)
        draw_arrow(ax, (branch, coda_y - 0.35), (branch, norm_y + 0.35))
        draw_box(ax, branch, norm_y, "RMSNorm", "norm", width=1.5, height=0.7)
        ax.text(branch + 0.85, norm_y - 0.45, f"$z_{t}$", ha="left", va="center", fontsize=9)
        for dx, label, part, value in ((-0.5, "head", "head", rf"logits$_{t}$"),
                                       (0.5, "gate", "gate", rf"$\lambda_{t}$")):
            draw_arrow(ax, (branch + dx / 2, norm_y - 0.35), (branch + dx, out_y + 0.3))
            draw_box(ax, branch + dx, out_y, label, part, width=0.9, height=0.6)
            draw_arrow(ax, (branch + dx, out_y - 0.3), (branch + dx, value_y + 0.1))
            ax.text(branch + dx, value_y, value, ha="center", va="top", fontsize=9)
        previous = branch

    ax.text(11.2, 0.5, "Same colour, same weights: one core, one coda, one norm, one head and one gate, "
            "used at every step", ha="center", va="center", fontsize=9, color="0.3")
    ax.set(xlim=(-0.2, step_x[-1] + 2.6), ylim=(0.1, bus_y + 1.3))
    ax.axis("off")


draw_unrolled_loop(S=4)
plt.show()

# %% [markdown]
# Nothing from a readout flows back into the loop: the coda's output and $z_t$ feed only the
# head and the gate, and step $t + 1$ starts from $h_t$ itself. With this chapter's defaults
# the figure simplifies: no prelude or coda blocks, `init` and the injection are identities
# ($h_0 = x_0$, $\mathrm{inject}(h, x_0) = h$), and there is no gate yet.

# %% [markdown]
# `forward` runs them: `encode` once, then `step` and `readout` in turn, $S$ times. It collects
# the readouts into the output record and, given targets, the per-step losses. Two optional
# arguments control where the loop starts: `state0=` gives $h_0$ explicitly, and
# `generator=` (a `torch.Generator`) drives every random draw of the forward, so that a
# random initial state (chapter 3) is reproducible call by call. Three more are for training,
# and chapter 4 explains them: `grad_steps=` (truncated backpropagation), `checkpoint=`
# (activation checkpointing) and `readout="last"`. They sit here so that training, like
# decoding, runs this one loop. The arguments are checked first:

# %%
#| export
def _check_grad_steps(grad_steps, n_loops):
    """grad_steps if it is an int in [1, n_loops]: how many of the last steps get gradients."""
    require_int("grad_steps", grad_steps, 1)
    if grad_steps > n_loops:
        raise ValueError(f"grad_steps must be <= n_loops: {n_loops} steps run, so at most {n_loops} "
                         f"can get gradients; got grad_steps={grad_steps}")
    return grad_steps


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _check_state0(state0, x0):
    """state0 as the loop's h_0: a floating tensor of x0's shape, in x0's dtype and device."""
    if not isinstance(state0, torch.Tensor) or not state0.is_floating_point():
        raise TypeError(f"state0 must be a floating-point tensor [B, T, d_model], got "
                        f"{getattr(state0, 'dtype', type(state0).__name__)}")
    if state0.shape != x0.shape:
        raise ValueError(f"state0 must have shape [B, T, d_model] = {list(x0.shape)}, got {list(state0.shape)}")
    return state0.to(device=x0.device, dtype=x0.dtype)

# %%
#| export
class LoopLM(nn.Module):
    """A looped (weight-tied) causal LM with a readout after every loop step.

    x0 = prelude(embed(idx)); h_0 = init_state(x0); for t = 1..S:
        h_t = core(injection(h_{t-1}, x0))                 (the same core weights every step)
        logits_t = lm_head(norm(coda(h_t)))                (coda runs per readout, not fed back)
    model(idx [B, T]) -> LoopOutput with logits [S, B, T, V]; S = config.n_loops unless
    n_loops= is given. With targets= [B, T] also step_losses [S, B, T] and loss (last step).
    """

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, LoopLMConfig):
            raise TypeError(f"config must be a LoopLMConfig, got {type(config).__name__}")
        _check_fits_in_memory(config, config.n_prelude + config.n_core + config.n_coda)
        self.config = c = config

        def blocks(n):            # chapter 8's attention when the config asks for it, else Block's own
            return nn.ModuleList(Block(c.d_model, c.n_heads, c.d_hidden, c.norm_style, c.eps,
                                       attn=ATTENTIONS["grouped"](c) if c.grouped_attention else None,
                                       mlp=None if c.mlp == "dense" else MLPS[c.mlp](c))
                                 for _ in range(n))

        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.rope = RotaryEmbedding(c.head_dim, c.max_seq_len, c.rope_base)
        self.prelude, self.core, self.coda = blocks(c.n_prelude), blocks(c.n_core), blocks(c.n_coda)
        self.norm = RMSNorm(c.d_model, c.eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        _init_weights([self.embed, self.prelude, self.core, self.coda, self.lm_head], c.init_std)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # the extension points: each factory builds (and initialises) its own module
        self.init_state = INIT_STATES[c.init_state](c)
        self.injection = INJECTIONS[c.injection](c)
        self.exit_gate = EXIT_GATES[c.gate_head](c) if c.exit_gate else None
        self.last_aux_loss = None     # the last forward's out.aux_loss (a mixture of experts, chapter 9)
        if c.kernels != "torch":      # chapter 10: the same parameters, computed by Triton kernels
            KERNEL_BACKENDS[c.kernels](self)

    def encode(self, idx, cos, sin, attend=None):
        """x0 = prelude(embed(idx)): the input representation every step can see. -> [B, T, D]

        attend: None (causal attention over idx itself), or attend(i) -> the attention op of
        prelude block i (a KV cache passes one; see Block)."""
        x = self.embed(idx)                                   # (B, T, D)
        if self.config.embed_scale != 1:                      # Huginn's sqrt(d) (chapter 8)
            x = x * self.config.embed_scale
        for i, block in enumerate(self.prelude):
            x = block(x, cos, sin, None if attend is None else attend(i))
        return x

    def step(self, h, x0, cos, sin, attend=None):
        """One loop step: h_t = core(injection(h_{t-1}, x0)). -> [B, T, D]; attend as in encode.
        With feedback_norm (Ouro, chapter 8) the step ends with the final norm: h_t = norm(core(...))."""
        h = self.injection(h, x0)
        for i, block in enumerate(self.core):
            h = block(h, cos, sin, None if attend is None else attend(i))
        return self.norm(h) if self.config.feedback_norm else h

    def readout(self, h, cos, sin, attend=None, last_only=False):
        """The prediction from state h: (logits [B, T, V], z [B, T, D]), z = norm(coda(h)).

        attend as in encode; last_only=True reads out the last position only (T = 1 in the
        results), which is all a decoder needs. Chapter 8's options: norm_before_coda runs the
        final norm before the coda too (Huginn); with feedback_norm, h is already normed (Ouro)."""
        c = self.config
        if c.norm_before_coda:
            h = self.norm(h)
        for i, block in enumerate(self.coda):
            h = block(h, cos, sin, None if attend is None else attend(i))
        z = h[:, -1:] if last_only else h
        z = z if c.feedback_norm else self.norm(z)
        return self.lm_head(z), z

    def forward(self, idx, targets=None, n_loops=None, return_hidden=False, state0=None, generator=None,
                grad_steps=None, checkpoint=False, readout="all"):
        """state0: an explicit h_0 [B, T, D] instead of init_state's; generator: a torch.Generator
        for every random draw of this forward (a random initial state).

        Three options serve training (chapter 4); none changes a forward value. grad_steps=k:
        only the last k steps get gradients (truncated backpropagation), the earlier ones run
        under no_grad and their readouts come back detached. checkpoint=True: each step with
        gradients is recomputed during backward instead of storing its activations.
        readout="last": read out the last step only (logits [1, B, T, V]); not with a gate.
        """
        c = self.config
        _check_token_ids("idx", idx, c.vocab_size, c.max_seq_len)
        if targets is not None:
            _check_targets(targets, idx, c.vocab_size)
        n_loops = c.n_loops if n_loops is None else require_int("n_loops", n_loops, 1)
        first_grad_step = 0 if grad_steps is None else n_loops - _check_grad_steps(grad_steps, n_loops)
        require_bool("checkpoint", checkpoint)
        require_bool("return_hidden", return_hidden)
        if readout not in ("all", "last"):
            raise ValueError(f"readout must be 'all' or 'last', got {readout!r}")
        if readout == "last" and self.exit_gate is not None:
            raise ValueError("readout='last' cannot be used with an exit gate: the gate needs every step's readout")
        _check_generator(generator)

        cos, sin = self.rope(idx.shape[1])                    # (T, hs/2) each
        x0 = self.encode(idx, cos, sin)                       # (B, T, D)
        routed = self.take_routing(self.prelude)              # experts' choices (chapter 9)
        if state0 is None:
            h = self.init_state(x0, generator=generator)      # h_0: (B, T, D)
        else:
            h = _check_state0(state0, x0)
        logits, gates, hidden, routing = [], [], [], []
        for t in range(n_loops):
            read = readout == "all" or t == n_loops - 1
            if t < first_grad_step:                           # truncated: no graph, nothing saved
                with torch.no_grad():
                    h, step_logits, gate, step_routed = self._step_and_read(h, x0, cos, sin, read)
            elif checkpoint and torch.is_grad_enabled():      # inputs saved, the rest recomputed
                h, step_logits, gate, step_routed = activation_checkpoint(self._step_and_read, h, x0, cos, sin,
                                                                          read, use_reentrant=False)
            else:
                h, step_logits, gate, step_routed = self._step_and_read(h, x0, cos, sin, read)
            if read:
                logits.append(step_logits)                    # (B, T, V)
                gates.append(gate)                            # (B, T), or None without a gate
            if return_hidden:
                hidden.append(h)
            routing.append(routed + step_routed)              # the prelude's go with step 1
            routed = []
        return self._output(logits, gates, hidden, targets, routing)

    def _step_and_read(self, h, x0, cos, sin, read=True):
        """One loop step, then (if read) its readout: -> (h_t, logits_t or None, gate_t or None,
        the step's routing records). The records are returned rather than read afterwards, so that
        a step recomputed for activation checkpointing is never counted twice."""
        h = self.step(h, x0, cos, sin)                        # h_t: (B, T, D)
        routed = self.take_routing(self.core)
        if not read:
            return h, None, None, routed
        logits, z = self.readout(h, cos, sin)                 # (B, T, V), (B, T, D)
        routed = routed + self.take_routing(self.coda)
        return h, logits, None if self.exit_gate is None else self.exit_gate(z), routed

    def take_routing(self, blocks):
        """[(mlp, record)] for the mixture-of-experts blocks among `blocks` (chapter 9), each
        record the one its last call left, which is then cleared. [] for a dense model."""
        if self.config.mlp == "dense":
            return []
        taken = []
        for block in blocks:
            taken.append((block.mlp, block.mlp.last_routing))
            block.mlp.last_routing = None
        return taken

    def balance_step(self):
        """After an optimizer step: let each block's MLP update what it balances with (chapter 9's
        bias balancing); nothing for a dense model."""
        if self.config.mlp != "dense":
            for block in (*self.prelude, *self.core, *self.coda):
                block.mlp.balance_step()

    def _output(self, logits, gates, hidden, targets=None, routing=None):
        """The output record from the per-step lists (the one place a LoopOutput is built)."""
        out = LoopOutput(logits=torch.stack(logits))          # (S, B, T, V)
        if self.config.mlp != "dense":                        # chapter 9: balancing loss, per-step load
            out.aux_loss, out.expert_load = MLPS[self.config.mlp].statistics(self.config, routing,
                                                                             count=self.training)
            self.last_aux_loss = out.aux_loss                 # for the Trainer: replaced every forward
        if self.exit_gate is not None:
            out.gate = torch.stack(gates)                     # (S, B, T)
            out.exit_probs = self.exit_gate.exit_probs(out.gate)
            weights = out.exit_probs.to(out.logits.dtype)[..., None]          # (S, B, T, 1)
            out.weighted_logits = (weights * out.logits).sum(0)               # (B, T, V), chapter 8
        if hidden:
            out.hidden = torch.stack(hidden)                  # (S, B, T, D)
        if targets is not None:
            out.step_losses = token_losses(out.logits, targets)           # (S, B, T)
            n_learned = (targets != IGNORE_INDEX).sum()
            out.loss = out.step_losses[-1].sum() / n_learned
        return out

    @classmethod
    def from_gpt(cls, gpt, n_loops=1):
        """The LoopLM whose core is gpt's stack (n_core = n_layers, no prelude or coda).

        Every weight is copied from gpt (the new model shares no tensor with it). With
        n_loops=1 its logits equal gpt's; with more steps it loops gpt's whole stack (Ouro).
        """
        if not isinstance(gpt, GPT):
            raise TypeError(f"gpt must be a GPT, got {type(gpt).__name__}")
        g = gpt.config
        config = LoopLMConfig(
            vocab_size=g.vocab_size, d_model=g.d_model, n_heads=g.n_heads, n_core=g.n_layers,
            n_loops=n_loops, d_hidden=g.d_hidden, max_seq_len=g.max_seq_len,
            norm_style=g.norm_style, tie_embeddings=g.tie_embeddings, rope_base=g.rope_base,
            eps=g.eps, init_std=g.init_std)
        first = next(gpt.parameters())
        model = cls(config).to(device=first.device, dtype=first.dtype)
        # the GPT's "blocks.<i>.…" are the looped model's "core.<i>.…"; every other name matches
        state = {("core." + name[len("blocks."):] if name.startswith("blocks.") else name): tensor
                 for name, tensor in gpt.state_dict().items()}
        model.load_state_dict(state)  # strict: every weight is matched by name, or this raises
        return model

# %% [markdown]
# A small looped model, one block looped four times, on the batch from before:

# %% tags=["nbval-check-output"]
_ = torch.manual_seed(0)
model = LoopLM(LoopLMConfig(vocab_size=VOCAB_SIZE, d_model=64, n_heads=4, n_loops=4))
out = model(idx)
print("idx", tuple(idx.shape), "-> out.logits", tuple(out.logits.shape), " (S, B, T, V)")
print("gate:", out.gate, " exit_probs:", out.exit_probs, " step_losses:", out.step_losses)

# %% [markdown]
# The step count is a run-time choice. The same weights run for 1 step or 12:

# %% tags=["nbval-check-output"]
for n_loops in (1, 12):
    print(f"n_loops={n_loops:2d}: logits", tuple(model(idx, n_loops=n_loops).logits.shape))

# %% [markdown]
# With `return_hidden=True` the record also holds the loop states, for watching how the size
# of $h_t$ evolves step by step (section 2.10 does, and so do later chapters):

# %% tags=["nbval-check-output"]
out = model(idx, return_hidden=True)
print("hidden", tuple(out.hidden.shape), " (S, B, T, D)")

# %% [markdown]
# The modules, with their parameter counts. The rope tables are buffers, not parameters, and
# the default injection and initial state have none:

# %% tags=["nbval-check-output"]
for name, child in model.named_children():
    print(f"{name:11s} {type(child).__name__:17s} {sum(p.numel() for p in child.parameters()):6d}")

# %% [markdown]
# The head's $V d$ parameters are the embedding's: with tied embeddings the two modules hold
# one tensor. `model.parameters()` yields each tensor once, so the total below
# counts it once.

# %% tags=["nbval-check-output"]
print("head is the embedding:", model.lm_head.weight is model.embed.weight)
print("total parameters:", sum(p.numel() for p in model.parameters()))

# %% [markdown]
# ## 2.7 Per-step losses on a real batch
#
# Chapter 0's addition task gives batches whose targets are the answer digits, with every other
# position set to `IGNORE_INDEX`. Four prompts of two-digit sums:

# %%
examples = make_task("addition").sample(4, difficulty=2, seed=0)
batch = encode_examples(examples)
print("prompts:", [e.prompt + e.answer for e in examples])
print("idx", tuple(batch.idx.shape), " learned positions:", int((batch.targets != IGNORE_INDEX).sum()))

# %% [markdown]
# An untrained looped model on this batch gives one loss per step, per row, per position:

# %% tags=["nbval-check-output"]
out = model(batch.idx, targets=batch.targets)
print("step_losses", tuple(out.step_losses.shape), " (S, B, T)")
print("zero wherever the target is ignored:",
      bool((out.step_losses[:, batch.targets == IGNORE_INDEX] == 0).all()))

# %% [markdown]
# Next we check `step_losses` against `F.cross_entropy` called step by step. We also check
# that `loss` is the mean of the last step over the learned positions:

# %% tags=["nbval-check-output"]
learned = batch.targets != IGNORE_INDEX                       # (B, T)
max_diff = 0.0
for t in range(out.logits.shape[0]):
    by_hand = F.cross_entropy(out.logits[t][learned], batch.targets[learned], reduction="none")
    max_diff = max(max_diff, (out.step_losses[t][learned] - by_hand).abs().max().item())
print("step_losses match F.cross_entropy per step (max |Δ| <= 1e-6):", max_diff <= 1e-6)
last = F.cross_entropy(out.logits[-1][learned], batch.targets[learned])
print("loss is the last step's mean:", torch.allclose(out.loss, last, atol=1e-6))

# %% [markdown]
# Nothing is trained yet, so every step's loss sits near $\ln V$:

# %%
print("mean loss per step:", [round(v, 2) for v in (out.step_losses.sum((1, 2)) / learned.sum()).tolist()])
print(f"ln V = {math.log(VOCAB_SIZE):.2f}")

# %% [markdown]
# ## 2.8 One step is a GPT
#
# `LoopLM.from_gpt(gpt)` builds a looped model whose core is the GPT's whole stack, and copies
# every weight across by name: `embed`, `norm` and `lm_head` match, and the GPT's
# `blocks.<i>` become the core's `core.<i>`. The load is strict, so a weight without a
# partner raises instead of being left at its random initial value.
#
# With one step, the looped model computes $W_{\text{head}}\,\mathrm{RMSNorm}(R(E[x]))$ with
# $R = \mathrm{block}_L \circ \dots \circ \mathrm{block}_1$. That is the GPT's formula.

# %% [markdown]
# We check it numerically. The printed result is a threshold, $\max |\Delta| \le 10^{-6}$ in
# float32, so the output does not depend on the last digits of a float. This function builds a
# random GPT, converts it, and compares the logits:

# %%
def one_step_difference(gpt_config, seed):
    """max |LoopLM.from_gpt(gpt) logits - gpt logits| for a random GPT and batch."""
    torch.manual_seed(seed)
    gpt = GPT(gpt_config)
    idx = torch.randint(0, gpt_config.vocab_size, (2, 12))
    with torch.no_grad():
        looped = LoopLM.from_gpt(gpt)(idx).logits             # (1, B, T, V)
        return (looped[0] - gpt(idx)).abs().max().item()

# %% [markdown]
# Twelve GPTs: three norm placements, tied and untied heads, one and three layers:

# %% tags=["nbval-check-output"]
for style in NORM_STYLES:
    for tie in (True, False):
        for n_layers, seed in ((1, 0), (3, 1)):
            gpt_config = GPTConfig(VOCAB_SIZE, 64, 4, n_layers, norm_style=style, tie_embeddings=tie)
            diff = one_step_difference(gpt_config, seed)
            print(f"{style:8s} tied={str(tie):5s} n_layers={n_layers}: max |Δ| <= 1e-6: {diff <= 1e-6}")

# %% [markdown]
# In fact the difference is exactly zero: the two models run the same operations in the same
# order on the same numbers.
#
# The copy is a copy, not an alias. Training the looped model afterwards must not change the
# GPT:

# %% tags=["nbval-check-output"]
looped = LoopLM.from_gpt(gpt)
print("no tensor shared with the GPT:",
      not {p.data_ptr() for p in looped.parameters()} & {p.data_ptr() for p in gpt.parameters()})

# %% [markdown]
# The other direction holds too: running a looped model for more steps is running a deeper
# GPT whose layers happen to share weights. A 1-block core run $t$ times reads out exactly what
# a $t$-layer GPT reads out when all its blocks hold the core's weights. We build those GPTs
# by copying the core block into every layer:

# %%
def unrolled_gpt(model, n_layers):
    """A GPT of n_layers blocks, each a copy of the 1-block core of `model` (no prelude, coda)."""
    c = model.config
    gpt = GPT(GPTConfig(c.vocab_size, c.d_model, c.n_heads, n_layers, c.d_hidden, c.max_seq_len,
                        c.norm_style, c.tie_embeddings, c.rope_base, c.eps, c.init_std))
    for name in ("embed", "norm", "lm_head"):
        getattr(gpt, name).load_state_dict(getattr(model, name).state_dict())
    for block in gpt.blocks:
        block.load_state_dict(model.core[0].state_dict())
    return gpt

# %% [markdown]
# Step $t$ of the looped model against the $t$-layer unrolled GPT, for $t = 1, \dots, 6$:

# %% tags=["nbval-check-output"]
with torch.no_grad():
    steps = model(idx, n_loops=6).logits                       # (6, B, T, V)
    for t in range(1, 7):
        diff = (steps[t - 1] - unrolled_gpt(model, t)(idx)).abs().max().item()
        print(f"step {t} vs {t}-layer unrolled GPT: max |Δ| <= 1e-6: {diff <= 1e-6}")

# %% [markdown]
# So a looped model is a deep network whose layers are constrained to be equal, and its $S$
# readouts are the readouts of $S$ networks of increasing depth. That constraint is what
# buys the parameter savings of section 2.9. Whether the constrained network can learn as
# well as the free one is the question the rest of the book takes up.

# %% [markdown]
# ### Tests for the equivalence
#
# The tests repeat these checks at other sizes. A test cell runs here, and the same functions
# are written to `tests/test_02_one_step_is_a_gpt.py` for pytest. First, `from_gpt` on several
# configurations, including the sandwich norm and an untied head:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_from_gpt_matches_gpt, test_from_gpt_copies_instead_of_sharing)

# %% [markdown]
# Then the other direction: a looped model with `n_core = L` and one step, built first, gives
# its weights to a GPT, and the two agree. And a 1-block core looped $t$ times agrees with the
# $t$-layer unrolled GPT at every step:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_looped_model_with_one_step_is_a_gpt, test_each_step_is_an_unrolled_gpt)

# %% [markdown]
# The other properties of the forward pass get tests too: the output shapes and the `n_loops`
# override, the per-step losses against `F.cross_entropy`, causality of the whole model, and
# determinism under a seed.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_output_shapes_and_n_loops_override, test_step_losses_match_cross_entropy,
          test_whole_model_is_causal, test_seed_gives_identical_outputs,
          test_float64_model_computes_in_float64)

# %% [markdown]
# ## 2.9 Parameter accounting
#
# Weight tying is the point of a looped model, so it is worth counting exactly what it saves.
# Write $N_{\text{block}} = 4d^2 + 3 d\, d_h + n_{\text{norms}}\, d$ for one block (chapter 1,
# section 1.7) and $[\text{untied}]$ for 1 when the head has its own matrix, else 0. Then
#
# $$
# N_{\text{GPT}} = V d\,(1 + [\text{untied}]) + L\, N_{\text{block}} + d ,
# $$
#
# $$
# N_{\text{LoopLM}} = V d\,(1 + [\text{untied}]) + (n_{\text{prelude}} + n_{\text{core}} + n_{\text{coda}})\, N_{\text{block}} + d + N_{\text{ext}} .
# $$

# %% [markdown]
# The last $d$ is the final norm's gain. $N_{\text{ext}}$ counts the modules from the registries:
# zero for this chapter's identity modules. Chapter 3's concat adapter is a linear map
# $\mathbb{R}^{2d} \to \mathbb{R}^d$, and chapter 5's gate a linear map
# $\mathbb{R}^d \to \mathbb{R}$. Those modules are small, and their own chapters give their
# formulas. Here we count them by building them.
#
# The formula for the looped model has no $S$ in it: **the step count does not change the
# parameter count.**

# %%
#| export
def gpt_param_count(config):
    """Parameters of GPT(config): V d (x2 if untied) + n_layers * block + d (final norm)."""
    c = config
    embeddings = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    block = block_param_count(c.d_model, c.n_heads, c.d_hidden, c.norm_style)
    return embeddings + c.n_layers * block + c.d_model


def looplm_param_count(config):
    """Parameters of LoopLM(config): like a GPT of n_prelude + n_core + n_coda blocks, plus the
    registry modules (injection, initial state, exit gate), counted by building them.
    Independent of n_loops."""
    c = config
    embeddings = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    block = block_param_count(c.d_model, c.n_heads, c.d_hidden, c.norm_style)
    if c.grouped_attention:   # chapter 8's attention replaces the 4 d² of Block's own: count it built
        block += sum(p.numel() for p in ATTENTIONS["grouped"](c).parameters()) - 4 * c.d_model**2
    if c.mlp != "dense":      # chapter 9's experts replace the SwiGLU: count them built
        block += sum(p.numel() for p in MLPS[c.mlp](c).parameters()) - 3 * c.d_model * (c.d_hidden or default_d_hidden(c.d_model))
    extensions = [INJECTIONS[c.injection](c), INIT_STATES[c.init_state](c)]
    if c.exit_gate:
        extensions.append(EXIT_GATES[c.gate_head](c))
    n_extension = sum(p.numel() for m in extensions for p in m.parameters())
    return embeddings + (c.n_prelude + c.n_core + c.n_coda) * block + c.d_model + n_extension

# %% [markdown]
# The formulas against PyTorch's count, first for three GPTs:

# %% tags=["nbval-check-output"]
def counted(model):
    return sum(p.numel() for p in model.parameters())


for n_layers, style, tie in ((2, "pre", True), (3, "sandwich", False), (4, "huginn", True)):
    gpt_config = GPTConfig(VOCAB_SIZE, 64, 4, n_layers, norm_style=style, tie_embeddings=tie)
    print(f"GPT    L={n_layers} {style:8s} tied={str(tie):5s} formula {gpt_param_count(gpt_config):7,d}"
          f"  counted {counted(GPT(gpt_config)):7,d}")

# %% [markdown]
# and for three looped models, from Ouro's shape (the whole stack looped) to Huginn's:

# %% tags=["nbval-check-output"]
for shape, style in (((0, 1, 0), "pre"), ((1, 2, 1), "sandwich"), ((2, 4, 2), "huginn")):
    loop_config = LoopLMConfig(VOCAB_SIZE, 64, 4, *shape, n_loops=8, norm_style=style)
    print(f"LoopLM {shape} {style:8s} formula {looplm_param_count(loop_config):7,d}"
          f"  counted {counted(LoopLM(loop_config)):7,d}")

# %% [markdown]
# Now the comparison that matters: parameters against effective depth. Three families, all of
# width 64 with pre-norm blocks:
#
# - **stacked**: GPTs of 1 to 12 distinct layers;
# - **looped**: one block, looped 1 to 12 times;
# - **prelude/core/coda (1, 2, 1)**: looped 1 to 5 times, effective depth $2 + 2S$.

# %% tags=["nbval-check-output"]
depths = range(1, 13)
stacked = {L: gpt_param_count(GPTConfig(VOCAB_SIZE, 64, 4, L)) for L in depths}
looped = {S: looplm_param_count(LoopLMConfig(VOCAB_SIZE, 64, 4, n_loops=S)) for S in depths}
middle = {2 + 2 * S: looplm_param_count(LoopLMConfig(VOCAB_SIZE, 64, 4, 1, 2, 1, n_loops=S))
          for S in range(1, 6)}

# %% [markdown]
# Side by side, by effective depth (a dash where the (1, 2, 1) model has no run of that depth):

# %% tags=["nbval-check-output"]
print(f"{'depth':>5} {'stacked':>9} {'looped 1-block':>15} {'looped (1,2,1)':>15}")
for depth in depths:
    mid = f"{middle[depth]:,d}" if depth in middle else "-"
    print(f"{depth:5d} {stacked[depth]:9,d} {looped[depth]:15,d} {mid:>15}")

# %% [markdown]
# The stacked model grows by one block, about 50k parameters at this width, per layer of
# depth. The looped models stay flat. At depth 12 the 1-block loop has exactly a twelfth of
# the stacked model's block parameters; the embedding and the final norm are the same for all.

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.8))
ax.plot(list(stacked), [n / 1e3 for n in stacked.values()], marker="o", label="stacked GPT (L layers)")
ax.plot(list(looped), [n / 1e3 for n in looped.values()], marker="s", label="1-block core, looped")
ax.plot(list(middle), [n / 1e3 for n in middle.values()], marker="^", label="prelude/core/coda (1, 2, 1), looped")
ax.set_xlabel("effective depth (blocks on the path to the last readout)")
ax.set_ylabel("parameters (thousands)")
ax.set_title(f"Parameters vs depth, d_model = 64, V = {VOCAB_SIZE}")
ax.set_ylim(bottom=0)
ax.legend()
plt.show()

# %% [markdown]
# Equal depth, very different parameter counts. Ouro's 1.4B model loops its 24 layers 4
# times, an effective depth of 96. Its authors {cite:p}`zhu2025ouro` compare it with Qwen3-4B,
# trained on almost five times as many tokens: level on BBH, ahead on GSM8K and MATH500, behind
# on MMLU (their Tables 7, 8 and 10), and they summarise their results as 2–3× parameter
# efficiency. Huginn's 3.5B parameters reach an effective depth of 132 layers at 32 steps.
# Fewer parameters are not less compute, though: a looped model pays for every step in time.

# %% [markdown]
# The weight sharing deserves a test of its own. The parameter count must not change with
# `n_loops`. The core's blocks must run once per step, with their own weights each time. And
# the gradient of a multi-step loss must accumulate into those same tensors:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_weights_are_shared_across_steps, test_param_count_formulas)

# %% [markdown]
# ## 2.10 What the loop does before training
#
# Nothing has been trained yet, so the readouts of later steps are not better predictions.
# They are still worth a look, because they show how the three norm placements of chapter 1
# behave inside a full model. We loop one untrained block 16 times and measure how much each
# step's next-token distribution moves from the step before:
#
# $$
# \mathrm{KL}(\pi_t \,\|\, \pi_{t-1}) = \sum_v \pi_t(v) \log \frac{\pi_t(v)}{\pi_{t-1}(v)} ,
# $$
#
# averaged over positions. Huginn's zero-shot exit rule {cite:p}`geiping2025huginn` stops a token
# when the KL between
# successive steps' next-token distributions drops below $5 \times 10^{-4}$.

# %% [markdown]
# At the default initialisation (std 0.02) an untrained model barely moves: its logits are
# all close to zero. We draw the weights with a larger standard deviation (0.2) to make the
# dynamics visible.

# %%
def successive_kl(logits):
    """KL(p_t || p_{t-1}) for t = 2..S, averaged over batch and positions: [S, B, T, V] -> [S-1]."""
    logp = logits.log_softmax(dim=-1)
    return (logp[1:].exp() * (logp[1:] - logp[:-1])).sum(-1).mean(dim=(1, 2))

# %% [markdown]
# One untrained model per norm placement, on the addition batch, with the loop states kept so
# that we can also watch their size:

# %%
drift = {}
for style in NORM_STYLES:
    torch.manual_seed(0)
    cfg = LoopLMConfig(VOCAB_SIZE, 64, 4, n_loops=16, norm_style=style, init_std=0.2)
    with torch.no_grad():
        out = LoopLM(cfg)(batch.idx, return_hidden=True)
    drift[style] = (successive_kl(out.logits), out.hidden.pow(2).mean(dim=(1, 2, 3)).sqrt())
    print(f"{style:8s} KL(step 2 || 1) {drift[style][0][0]:.1e}   KL(step 16 || 15) {drift[style][0][-1]:.1e}")

# %%
fig, (ax_kl, ax_rms) = plt.subplots(1, 2, figsize=(10, 3.6))
for style, (kl, rms) in drift.items():
    ax_kl.plot(range(2, 17), kl, marker=".", label=style)
    ax_rms.plot(range(1, 17), rms, marker=".", label=style)
ax_kl.axhline(5e-4, color="gray", linestyle="--", linewidth=1)
ax_kl.text(2, 6e-4, "Huginn's exit threshold", color="gray", fontsize=8)
ax_kl.set(yscale="log", xlabel="step t", ylabel=r"KL$(p_t \,\|\, p_{t-1})$",
          title="How far each step moves the prediction")
ax_rms.set(yscale="log", xlabel="step t", ylabel=r"RMS of $h_t$", title="Size of the loop state")
ax_kl.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The readout's norm hides the size of $h_t$ from the head: only its direction matters to the
# logits. So the question is whether the *direction* settles.
#
# - **pre**: each step adds an update of bounded size, so the state grows about linearly. A
#   growing state is turned less and less by an update of the same size, and the prediction
#   drifts less each step: the KL falls by more than two orders of magnitude over 16 steps.
# - **sandwich**: the updates are normalised themselves, and the picture is the same: linear
#   growth, a direction that settles.
# - **huginn**: the state is renormalised inside every block and keeps RMS 1. Each step can
#   turn it as much as the last, and the prediction keeps moving.
#
# At the default initialisation the first two settle even faster: their KL falls below
# Huginn's threshold within a few steps, with no training at all.

# %% [markdown]
# None of this is learned behaviour, and training changes all of it. Note what it means for
# the exit rules of later chapters: "the prediction stopped changing" can come from a
# growing state as easily as from a solved problem. Chapter 3 adds input injection, which
# keeps the input in view at every step, and compares the placements on a task.

# %% [markdown]
# ## 2.11 Bad input gets a clear error
#
# Every config field is checked, and so is every input. A few mistakes and their messages:

# %%
def show_error(make):
    """Call make(); print the ValueError or TypeError it raises."""
    try:
        make()
    except (ValueError, TypeError) as e:
        print(f"{type(e).__name__}: {e}")
    else:
        print("no error")

# %% [markdown]
# Config values: a zero loop count, a negative prelude, an unknown norm style, an injection
# that does not exist (yet), and a non-integer width.

# %% tags=["nbval-check-output"]
show_error(lambda: LoopLMConfig(VOCAB_SIZE, 64, 4, n_loops=0))
show_error(lambda: LoopLMConfig(VOCAB_SIZE, 64, 4, n_prelude=-1))
show_error(lambda: LoopLMConfig(VOCAB_SIZE, 64, 4, norm_style="post"))
show_error(lambda: LoopLMConfig(VOCAB_SIZE, 64, 4, injection="add"))
show_error(lambda: GPTConfig(VOCAB_SIZE, 64.0, 4, n_layers=2))

# %% [markdown]
# Asking for the exit gate before chapter 5 is an error too. (Once the package has a gate
# registered, the same call builds a model with one.)

# %%
show_error(lambda: LoopLMConfig(VOCAB_SIZE, 64, 4, exit_gate=True))

# %% [markdown]
# Inputs: floats where token ids belong, a missing batch dimension, an id past the vocabulary,
# a sequence longer than `max_seq_len`, targets of the wrong shape, targets with nothing to
# learn, and a zero step count at call time.

# %% tags=["nbval-check-output"]
small = LoopLM(LoopLMConfig(VOCAB_SIZE, 32, 2, max_seq_len=16))
ids = torch.randint(0, VOCAB_SIZE, (2, 8))
show_error(lambda: small(ids.float()))
show_error(lambda: small(ids[0]))
show_error(lambda: small(torch.full((2, 8), VOCAB_SIZE)))
show_error(lambda: small(torch.zeros(2, 20, dtype=torch.long)))
show_error(lambda: small(ids, targets=ids[:, :5]))
show_error(lambda: small(ids, targets=torch.full_like(ids, IGNORE_INDEX)))
show_error(lambda: small(ids, n_loops=0))

# %% [markdown]
# The tests in Appendix C (section C.5) pin every one of these messages, field by field, and
# check the registries this chapter leaves for later chapters to fill.

# %% [markdown]
# ## Summary
#
# `looplm/model.py` now holds both models. With what chapters 3 and 5 add to it (the
# injections, the initial states and the exit gate, each in its registry) it ends up near 600
# lines, over nanoGPT's 330: two configs that validate every field, and the registries that
# let later chapters extend the model without editing this one, are the difference.
#
# | name | what it is |
# |---|---|
# | `GPTConfig(vocab_size, d_model, n_heads, n_layers, d_hidden=None, max_seq_len=256, norm_style="pre", tie_embeddings=True, rope_base=10000.0, eps=1e-6, init_std=0.02)` | frozen, validated config |
# | `GPT(config)` | `gpt(idx [B, T]) -> logits [B, T, V]`: embed, $L$ blocks, norm, head |
# | `LoopLMConfig(vocab_size, d_model, n_heads, n_prelude=0, n_core=1, n_coda=0, n_loops=4, exit_gate=False, injection="none", init_state="embedding", gate_head="linear", …)` | the GPT's shared fields plus the loop's; `effective_depth(n_loops=None)` |
# | `LoopLM(config)` | `model(idx, targets=None, n_loops=None, return_hidden=False) -> LoopOutput`; methods `encode`, `step`, `readout` |
# | `LoopLM.from_gpt(gpt, n_loops=1)` | the GPT's stack as the core, weights copied; one step gives the GPT's logits |
# | `LoopOutput` | `logits [S, B, T, V]`, `gate`, `exit_probs`, `step_losses [S, B, T]`, `loss`, `hidden [S, B, T, D]` |
# | `token_losses(logits, targets)` | per-token cross-entropy over any leading dims, 0 at `IGNORE_INDEX` |
# | `gpt_param_count(config)`, `looplm_param_count(config)` | the formulas of section 2.9 |
# | `INJECTIONS`, `INIT_STATES`, `EXIT_GATES` | registries: name $\to$ factory `(config) -> nn.Module` |
# | `NoInjection`, `EmbeddingInit` | the entries `"none"` and `"embedding"` |

# %% [markdown]
# One step of a looped model is a GPT, and $S$ steps are a GPT $S$ times as deep whose layers
# share one set of weights. Chapter 3 trains looped models on chapter 0's tasks, adds input
# injection and other initial states to the registries, and asks what the extra steps buy.

# %% [markdown]
# ## Exercises
#
# Each exercise is a module in `exercises/ch02/` with a function for you to write, plus a file
# of graded tests next to it. Open the module, read its docstring, and replace the
# `raise NotImplementedError(...)`. The reference solutions are in `exercises/solutions/ch02/`,
# to read after you have tried. Under each exercise are hints, folded away: open them one at a
# time, and only when you are stuck.

# %% [markdown]
# **Exercise 2.1: Copy a GPT into a looped model** (`ex1_copy_gpt_weights.py`). Write
# `copy_gpt_weights(gpt, model)`, which fills a freshly made `LoopLM` (one step, a core of
# the GPT's depth, no prelude or coda) with the GPT's weights, so that the two give the same
# logits. This is the heart of `LoopLM.from_gpt`, without the state-dict renaming: walk the
# modules yourself. The tests compare logits to $10^{-6}$, with tied and untied heads. They
# also check that nothing is shared and that mismatched shapes are refused.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Pair the modules that correspond: `(gpt.embed, model.embed)`, `(gpt.norm, model.norm)`,
# `(gpt.lm_head, model.lm_head)`, and the blocks, `zip(gpt.blocks, model.core)`. Within a pair,
# `named_parameters()` gives the same names on both sides.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# Check everything before copying anything, so that a refused pair leaves `model` untouched:
# the configs tell you about a prelude, a coda, the depth and the tying; then compare, pair by
# pair, the names and shapes in `dict(source.named_parameters())` and
# `dict(target.named_parameters())`.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# Copy in place, inside `with torch.no_grad():`, with `target_param.copy_(source_param)`. The
# values land in `model`'s own tensors, so nothing is shared with the GPT. A tied head stays
# tied, because `model.lm_head.weight` is the same tensor as `model.embed.weight`: copying into
# one fills both.
# ```

# %% [markdown]
# **Exercise 2.2: The looped forward pass** (`ex2_looped_forward.py`). Write
# `looped_logits(model, idx, n_loops)`, which runs a `LoopLM`'s parts (embedding, prelude,
# core, coda, norm, head) by hand and returns the logits of every step, $[S, B, T, V]$. The
# tests compare against GPTs unrolled from the model's weights, and against a reference
# written in the test file, with prelude and coda.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Section 2.6's three methods are the recipe: `encode` once, then `step` and `readout` in turn,
# once per step. Your function writes their bodies out in one place, with the default
# injection (none) and initial state (the embedding) left out.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# Make the rope rows once, `cos, sin = model.rope(idx.shape[1])`, and pass them to every block.
# The coda belongs to the readout: run it on a copy, `y = h`, then the coda's blocks on `y`,
# then `model.lm_head(model.norm(y))`. The next step continues from `h`, not from `y`.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# The whole loop:
# `h = model.embed(idx)`; the prelude's blocks on `h`; then `n_loops` times: the core's blocks on
# `h`, `y = h`, the coda's blocks on `y`, and append `model.lm_head(model.norm(y))` to a list.
# Return `torch.stack(logits)`, shape `[n_loops, B, T, V]`.
# ```

# %% [markdown]
# **Exercise 2.3: What a step costs** (`ex3_step_cost.py`). Section 2.9 showed that the step
# count does not change the parameters. Count what it does change: write
# `linear_flops(config, n_tokens, n_loops=None)`, the floating-point operations of every
# `nn.Linear` call in one forward pass (2 per weight per token), split into prelude, core, coda
# and head. The tests put a forward hook on every linear layer of a real `LoopLM` and a real
# `GPT`, count what actually runs, and require your numbers exactly. Then compare a loop of one
# block run 12 times with the 12-layer GPT of the same effective depth: which costs more, by
# how much, and where does the difference go? How large would it be with GPT-2's vocabulary of
# 50,257 tokens at width 768?

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# A block's linear layers are `attn.qkv`, `attn.proj`, `mlp.gate`, `mlp.up` and `mlp.down`
# (chapter 1, sections 1.4 and 1.5). Their weights are exactly the block's parameters without
# the norm gains: the matrix rows of section 1.7's table.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# Now count how often each part runs in a forward pass of $S$ steps. The prelude runs once and
# the core every step. Read `LoopLM.forward`: does the readout (the coda and the head) run once
# per forward pass, or once per step? A tied head shares its matrix with the embedding, but it
# still multiplies.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# Per token, a block costs $2(4d^2 + 3\,d\,d_h)$, with $d_h$ = `config.d_hidden` or
# `default_d_hidden(d)`, and the head $2Vd$. With $N$ tokens: prelude
# $n_{\text{prelude}} \cdot 2(4d^2 + 3 d d_h) N$; core and coda the same with
# $S\,n_{\text{core}}$ and $S\,n_{\text{coda}}$ blocks; head $S \cdot 2VdN$. Against a GPT of
# depth $n_{\text{prelude}} + S\,n_{\text{core}} + n_{\text{coda}}$, the loop pays $S - 1$ extra
# readouts.
# ```

# %% [markdown]
# The next cell grades your versions. Run it again whenever you like; every test fails until
# you write the code.

# %%
from looplm.grade import grade

report = grade("ch02")
