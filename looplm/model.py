# Generated from book/02_one_step_is_a_gpt.py, book/03_fixed_loops.py, book/05_learning_when_to_stop.py, book/08_real_models.py, book/09_mixture_of_experts.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['MAX_VOCAB_SIZE', 'GPTConfig', 'GPT', 'NoInjection', 'EmbeddingInit', 'INJECTIONS', 'INIT_STATES', 'EXIT_GATES', 'ATTENTIONS', 'MLPS', 'CONFIG_CHECKS', 'KERNEL_BACKENDS', 'LoopLMConfig', 'LoopOutput', 'token_losses', 'LoopLM', 'gpt_param_count', 'looplm_param_count', 'AddInjection', 'ConcatInjection', 'ZerosInit', 'RandomInit', 'LinearExitGate', 'MOE_DEFAULTS']
# fmt: on

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from looplm.block import (NORM_STYLES, Block, GroupedQueryAttention, RMSNorm, RotaryEmbedding,
                          block_param_count, default_d_hidden)
from looplm.checks import require_bool, require_choice, require_int, require_number
from looplm.data import IGNORE_INDEX
from looplm.moe import LoopMoE

# --- book/02_one_step_is_a_gpt.py:113 (cell 11) ---
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

# --- book/02_one_step_is_a_gpt.py:145 (cell 13) ---
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

# --- book/02_one_step_is_a_gpt.py:184 (cell 15) ---
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

# --- book/02_one_step_is_a_gpt.py:252 (cell 21) ---
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

# --- book/02_one_step_is_a_gpt.py:276 (cell 23) ---
def _init_weights(modules, std):
    """Normal(0, std) for every Linear and Embedding weight inside `modules`; norm gains stay 1."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)

# --- book/02_one_step_is_a_gpt.py:289 (cell 25) ---
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

# --- book/02_one_step_is_a_gpt.py:449 (cell 43) ---
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

# --- book/02_one_step_is_a_gpt.py:486 (cell 46) ---
INJECTIONS = {"none": NoInjection}          # chapter 3 adds "add" and "concat"
INIT_STATES = {"embedding": EmbeddingInit}  # chapter 3 adds "zeros" and "random"
EXIT_GATES = {}                             # chapter 5 adds "linear", Ouro's gate
ATTENTIONS = {}                             # chapter 8 adds "grouped", grouped-query attention
MLPS = {}                                   # chapter 9 adds "moe", a mixture of experts
CONFIG_CHECKS = {}                          # chapters 8-10 add the checks of their config fields
KERNEL_BACKENDS = {}                        # chapter 10 adds "triton": the same model on fused kernels

# --- book/02_one_step_is_a_gpt.py:521 (cell 51) ---
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

# --- book/02_one_step_is_a_gpt.py:541 (cell 53) ---
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

# --- book/02_one_step_is_a_gpt.py:661 (cell 57) ---
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

# --- book/02_one_step_is_a_gpt.py:698 (cell 60) ---
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

# --- book/02_one_step_is_a_gpt.py:718 (cell 62) ---
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

# --- book/02_one_step_is_a_gpt.py:861 (cell 68) ---
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

# --- book/02_one_step_is_a_gpt.py:887 (cell 69) ---
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

# --- book/02_one_step_is_a_gpt.py:1523 (cell 108) ---
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

# --- book/03_fixed_loops.py:175 (cell 16) ---
class AddInjection(nn.Module):
    """injection="add": inject(h, x0) = h + RMSNorm(x0), with the norm's own learned gain.

    The additive injection of Yang et al. (arXiv 2311.12424) and TRM, with the input
    normalised so that the gain `self.norm.weight` [d_model] sets its scale (starts at 1).
    """

    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.eps)

    def forward(self, h, x0):
        return h + self.norm(x0)                              # (B, T, D)

# --- book/03_fixed_loops.py:217 (cell 19) ---
class ConcatInjection(nn.Module):
    """injection="concat": inject(h, x0) = adapter([h; x0]), a Linear(2 d -> d) (Huginn).

    The adapter's weight [d_model, 2 d_model] starts as Normal(0, 2 / (5 d_model)), Huginn's
    initialisation; no bias. Its first d columns act on the state, the last d on the input.
    """

    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.adapter = nn.Linear(2 * d, d, bias=False)
        nn.init.normal_(self.adapter.weight, mean=0.0, std=math.sqrt(2 / (5 * d)))

    def forward(self, h, x0):
        return self.adapter(torch.cat([h, x0], dim=-1))      # (B, T, 2D) -> (B, T, D)

# --- book/03_fixed_loops.py:239 (cell 21) ---
INJECTIONS.update({"add": AddInjection, "concat": ConcatInjection})

# --- book/03_fixed_loops.py:398 (cell 33) ---
def _require_injection(config, init_state):
    """init_state `init_state` drops x0, so the loop must get it back through an injection."""
    if config.injection == "none":
        others = ", ".join(repr(name) for name in INJECTIONS if name != "none")
        raise ValueError(f"init_state={init_state!r} starts the loop without the input and "
                         f"injection='none' never adds it, so the model could not see its tokens; "
                         f"use an injection ({others}) or init_state='embedding'")

# --- book/03_fixed_loops.py:411 (cell 35) ---
class ZerosInit(nn.Module):
    """init_state="zeros": h_0 = 0 (Yang et al., arXiv 2311.12424). Needs an injection."""

    def __init__(self, config):
        super().__init__()
        _require_injection(config, "zeros")

    def forward(self, x0, generator=None):
        return torch.zeros_like(x0)                           # (B, T, D)

# --- book/03_fixed_loops.py:439 (cell 37) ---
class RandomInit(nn.Module):
    """init_state="random": h_0 ~ Normal(0, σ²) truncated at ±3σ, a fresh draw per forward (Huginn).

    σ is config.init_state_std, sqrt(2/5) by default (Huginn-0125's). Draws come from
    `generator` (a torch.Generator), else from `self.generator` when it is set, else from
    torch's global generator (seeded by torch.manual_seed). Needs an injection.
    """

    def __init__(self, config):
        super().__init__()
        _require_injection(config, "random")
        self.std, self.generator = config.init_state_std, None

    def forward(self, x0, generator=None):
        generator = self.generator if generator is None else generator
        device = x0.device if generator is None else generator.device
        h0 = torch.empty(x0.shape, device=device, dtype=torch.promote_types(x0.dtype, torch.float32))
        nn.init.trunc_normal_(h0, mean=0.0, std=self.std, a=-3 * self.std, b=3 * self.std,
                              generator=generator)
        return h0.to(device=x0.device, dtype=x0.dtype)        # (B, T, D)

# --- book/03_fixed_loops.py:462 (cell 38) ---
INIT_STATES.update({"zeros": ZerosInit, "random": RandomInit})

# --- book/05_learning_when_to_stop.py:134 (cell 9) ---
class LinearExitGate(nn.Module):
    """Ouro's exit gate: λ_t = sigmoid(Linear(d_model, 1)(z_t)), one value per token per step.

    z_t is the normed state the LM head reads. forward(z [B, T, D]) -> λ [B, T] in (0, 1),
    float32 (float64 for a float64 model). exit_probs(gate [S, B, T]) -> p(t | x) [S, B, T] (as looplm.adaptive.exit_distribution).
    """

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.d_model, 1)            # bias on, as in Ouro
        nn.init.normal_(self.proj.weight, mean=0.0, std=config.init_std)
        nn.init.zeros_(self.proj.bias)                      # every gate starts near 1/2

    def forward(self, z):
        logit = self.proj(z)
        return torch.sigmoid(logit.to(torch.promote_types(logit.dtype, torch.float32))).squeeze(-1)   # (B, T)

    def exit_probs(self, gate):
        return _exit_distribution(gate)                      # the model's own gate needs no checks


EXIT_GATES["linear"] = LinearExitGate

# --- book/05_learning_when_to_stop.py:254 (cell 18) ---
def _exit_distribution(gate):
    """exit_distribution without the input checks (for gates a model computed itself)."""
    survive = torch.cumprod(1 - gate[:-1], dim=0)               # S_1 .. S_{S-1}: (S-1, ...)
    reach = torch.cat([torch.ones_like(gate[:1]), survive])      # S_0 .. S_{S-1}: (S, ...)
    return torch.cat([gate[:-1] * reach[:-1], reach[-1:]])        # (S, ...)

# --- book/08_real_models.py:192 (cell 9) ---
def _grouped_attention(config):
    return GroupedQueryAttention(config.d_model, config.n_heads, config.n_kv_heads, config.qk_bias)


ATTENTIONS["grouped"] = _grouped_attention

# --- book/08_real_models.py:209 (cell 11) ---
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

# --- book/09_mixture_of_experts.py:607 (cell 28) ---
MLPS["moe"] = LoopMoE
MOE_DEFAULTS = dict(n_experts=None, top_k=None, d_expert=None, n_shared_experts=0, router="softmax",
                    capacity_factor=None, balance="switch", balance_pool="all", z_loss=0.0, bias_rate=1e-3)


def _validate_moe(cfg):
    """The MoE fields: with mlp="dense" each must keep its default; with "moe", each in range."""
    require_choice("mlp", cfg.mlp, ("dense", *MLPS))
    if cfg.mlp == "dense":
        for name, default in MOE_DEFAULTS.items():
            if getattr(cfg, name) != default:
                raise ValueError(f"{name}={getattr(cfg, name)!r} is an option of a mixture of experts, and "
                                 f"mlp='dense' has none: use mlp='moe' (chapter 9), or leave {name} at {default!r}")
        return
    n_experts = require_int("n_experts", cfg.n_experts if cfg.n_experts is not None else 8, 1)
    top_k = require_int("top_k", cfg.top_k if cfg.top_k is not None else 2, 1)
    if top_k > n_experts:
        raise ValueError(f"top_k={top_k} must be <= n_experts={n_experts}: a token cannot use more experts "
                         f"than there are")
    if cfg.d_expert is not None:
        require_int("d_expert", cfg.d_expert, 1)
    require_int("n_shared_experts", cfg.n_shared_experts, 0)
    require_choice("router", cfg.router, ("softmax", "sigmoid"))
    if cfg.capacity_factor is not None:
        require_number("capacity_factor", cfg.capacity_factor, 0, low_open=True)
    require_choice("balance", cfg.balance, ("switch", "entropy", "bias", "none"))
    require_choice("balance_pool", cfg.balance_pool, ("all", "step"))
    require_number("z_loss", cfg.z_loss, 0)
    require_number("bias_rate", cfg.bias_rate, 0)


CONFIG_CHECKS["mixture of experts"] = _validate_moe
