# Generated from book/07_inference.py, book/07a_appendix_decoding.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['CacheStrategy', 'CACHE_STRATEGIES', 'cache_strategy', 'LayerCache', 'LoopKVCache', 'GenerationResult', 'choose_tokens', 'generate', 'main']
# fmt: on

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from looplm.checkpoints import load_model, load_model_flag, save_model   # the command line's, and for importers
from looplm.checks import require_bool, require_int, require_number
from looplm.data import TASK_VOCAB
from looplm.exits import EXIT_RULES, ExitRule, StepView, exit_steps, make_exit_rule
from looplm.model import LoopLM, _check_generator, _physical_memory_bytes

# --- book/07_inference.py:201 (cell 12) ---
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

# --- book/07_inference.py:255 (cell 14) ---
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

# --- book/07_inference.py:525 (cell 21) ---
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

# --- book/07_inference.py:566 (cell 23) ---
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

# --- book/07_inference.py:691 (cell 25) ---
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

# --- book/07_inference.py:715 (cell 27) ---
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

# --- book/07_inference.py:770 (cell 31) ---
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

# --- book/07_inference.py:848 (cell 33) ---
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

# --- book/07a_appendix_decoding.py:278 (cell 10) ---
class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: ...`, with exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser():
    p = _Parser(prog="python -m looplm.generate",
                description="Complete prompts with a saved looped LM (KV cache, per-token exit).")
    p.add_argument("--checkpoint", required=True, help="a file written by save_model or python -m looplm.train")
    p.add_argument("--prompt", action="append", required=True, help="a prompt in the task vocabulary (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="at most this many new tokens (default: as many as the model's context allows)")
    p.add_argument("--cache", default="exact", help="exact, last, first, average or mod-K (default exact)")
    p.add_argument("--exit-rule", default="none", choices=["none", *EXIT_RULES], help="per-token exit (default none)")
    p.add_argument("--exit-threshold", type=float, default=None, help="the rule's threshold (default: the rule's own)")
    p.add_argument("--min-steps", type=int, default=1)
    p.add_argument("--n-loops", type=int, default=None, help="loop steps (default: the model's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (needs --temperature)")
    p.add_argument("--seed", type=int, default=0, help="the sampling generator's seed, in [0, 2**64)")
    return p


def _rule_from_args(args):
    if args.min_steps < 1:
        raise ValueError(f"--min-steps must be an int >= 1, got {args.min_steps}")
    if args.exit_rule == "none":
        if args.exit_threshold is not None:
            raise ValueError(f"--exit-threshold {args.exit_threshold} has no rule to set: add --exit-rule "
                             f"({', '.join(EXIT_RULES)})")
        return None
    threshold = EXIT_RULES[args.exit_rule].default_threshold if args.exit_threshold is None else args.exit_threshold
    if not math.isfinite(threshold):
        raise ValueError(f"--exit-threshold must be a finite number, got {threshold}")
    if args.exit_rule == "fixed":
        if not float(threshold).is_integer():
            raise ValueError(f"--exit-threshold is the number of steps for --exit-rule fixed, a whole number "
                             f">= 1, got {threshold}")
        threshold = int(threshold)
    try:
        return make_exit_rule(args.exit_rule, threshold, min_steps=args.min_steps)
    except ValueError as e:
        raise ValueError(f"--exit-threshold {threshold} does not suit --exit-rule {args.exit_rule}: {e}") from e


def _check_flags(args, vocab):
    """The flags' values checked on their own, before any file is read. -> (exit rule, prompt ids)."""
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be an int >= 0, got {args.max_new_tokens}")
    try:
        cache_strategy(args.cache)
    except ValueError as e:
        raise ValueError(f"--cache: {e}") from e
    rule = _rule_from_args(args)
    if args.n_loops is not None and args.n_loops < 1:
        raise ValueError(f"--n-loops must be an int >= 1, got {args.n_loops}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be an int >= 1, got {args.top_k}")
        if args.temperature == 0:
            raise ValueError(f"--top-k {args.top_k} has no effect on greedy decoding: add --temperature T > 0")
    if not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed must be an int in [0, 2**64), got {args.seed}")
    prompts = []
    for text in args.prompt:
        if not text:
            raise ValueError("--prompt '' is empty: generation needs at least one token to start from")
        try:
            prompts.append(vocab.encode(text))
        except ValueError as e:
            raise ValueError(f"--prompt {text!r}: {e}") from e
    return rule, prompts


def _check_against_model(args, model, rule, prompts):
    """The flags checked against the loaded model. -> max_new_tokens."""
    c = model.config
    for text, ids in zip(args.prompt, prompts):
        if max(ids) >= c.vocab_size:
            raise ValueError(f"--prompt {text!r} holds token id {max(ids)}, outside the vocabulary of the model in "
                             f"--checkpoint (vocab_size={c.vocab_size}): it was not trained on the task vocabulary")
    longest = max(len(ids) for ids in prompts)
    if longest > c.max_seq_len:
        raise ValueError(f"--prompt: the longest prompt has {longest} tokens, more than the context of the model in "
                         f"--checkpoint holds (max_seq_len={c.max_seq_len})")
    room = c.max_seq_len - longest + 1                     # the last new token is never fed back
    if args.max_new_tokens is not None and args.max_new_tokens > room:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} is too many: the longest prompt has {longest} "
                         f"tokens, and {longest} + {args.max_new_tokens} - 1 = {longest + args.max_new_tokens - 1} "
                         f"positions (every new token but the last is fed back) do not fit the model's context "
                         f"(max_seq_len={c.max_seq_len}); use --max-new-tokens {room} or less")
    if rule is not None and "gates" in rule.needs and model.exit_gate is None:
        raise ValueError(f"--exit-rule {args.exit_rule} reads the exit gate, and the model in --checkpoint has "
                         f"none: choose another --exit-rule")
    max_new = room if args.max_new_tokens is None else args.max_new_tokens
    n_loops = c.n_loops if args.n_loops is None else args.n_loops
    try:
        _check_cache_fits(model, cache_strategy(args.cache), len(prompts), longest, max(max_new - 1, 0), n_loops,
                          next(model.parameters()).device)
    except ValueError as e:
        raise ValueError(f"--n-loops {n_loops} with --max-new-tokens {max_new}: {e}") from e
    return max_new


def main(argv=None):
    """python -m looplm.generate --help. Returns an exit status."""
    args = _parser().parse_args(argv)
    vocab = TASK_VOCAB
    try:
        rule, prompts = _check_flags(args, vocab)
        model = load_model_flag(args.checkpoint)
        max_new = _check_against_model(args, model, rule, prompts)
        generator = torch.Generator().manual_seed(args.seed)
        res = generate(model, prompts, max_new, temperature=args.temperature, top_k=args.top_k,
                       stop_tokens=[vocab.eos_id], cache=args.cache, exit_rule=rule, n_loops=args.n_loops,
                       pad_id=vocab.pad_id, generator=generator)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for text, new, steps in zip(args.prompt, res.new_tokens.tolist(), res.steps.tolist()):
        kept = [(t, s) for t, s in zip(new, steps) if s > 0]
        completion = vocab.decode([t for t, _ in kept])
        print(f"{text} -> {completion}   steps per token {[s for _, s in kept]}")
    return 0
