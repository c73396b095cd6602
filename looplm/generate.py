# Generated from book/06_inference.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['CacheStrategy', 'CACHE_STRATEGIES', 'cache_strategy', 'LayerCache', 'LoopKVCache', 'GenerationResult', 'choose_tokens', 'generate', 'save_model', 'load_model', 'RULE_DEFAULTS', 'main']
# fmt: on

# --- book/06_inference.py, cell 6 ---
import argparse
import re
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from looplm.adaptive import EXIT_RULES, ExitRule, StepView, exit_steps, make_exit_rule
from looplm.data import TASK_VOCAB
from looplm.model import LoopLM, LoopLMConfig, _require_int
from looplm.train import CheckpointError, checkpoint_model, read_checkpoint, save_checkpoint

# --- book/06_inference.py, cell 12 ---
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

# --- book/06_inference.py, cell 14 ---
class LayerCache:
    """Keys and values of one block: prompt part [C, B, nh, Tp, hs], decoded part [K, B, nh, N, hs]."""

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
        dims = (self.batch, c.n_heads, self.prompt_len, n_new, c.head_dim, param.device, param.dtype)
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
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self._prefill_mask)

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
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

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

# --- book/06_inference.py, cell 18 ---
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

# --- book/06_inference.py, cell 20 ---
def _prompt_batch(idx, vocab_size, pad_id, room):
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
    if longest > room:
        raise ValueError(f"the longest prompt has {longest} tokens; with max_new_tokens the model's context "
                         f"(max_seq_len) leaves room for at most {room}")
    lengths = torch.tensor([row.numel() for row in rows])
    padded = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, longest - row.numel():] = row
    return padded, lengths


def _check_generate_args(model, max_new_tokens, temperature, top_k, stop_tokens, exit_rule, n_loops, pad_id):
    if not isinstance(model, LoopLM):
        raise TypeError(f"model must be a LoopLM, got {type(model).__name__}")
    c = model.config
    _require_int("max_new_tokens", max_new_tokens, 0)
    n_loops = c.n_loops if n_loops is None else _require_int("n_loops", n_loops, 1)
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not temperature >= 0 or temperature == float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None:
        _require_int("top_k", top_k, 1)
    if not (isinstance(pad_id, int) and 0 <= pad_id < c.vocab_size):
        raise ValueError(f"pad_id must be a token id in [0, {c.vocab_size}), got {pad_id!r}")
    stops = set()
    for t in (stop_tokens or ()):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < c.vocab_size:
            raise ValueError(f"stop_tokens must be token ids in [0, {c.vocab_size}), got {t!r}")
        stops.add(t)
    if isinstance(exit_rule, str):
        try:
            exit_rule = make_exit_rule(exit_rule)
        except TypeError as e:
            raise ValueError(f"exit rule {exit_rule!r} needs a threshold: pass "
                             f"make_exit_rule({exit_rule!r}, threshold) instead of its name") from e
    if exit_rule is not None and not isinstance(exit_rule, ExitRule):
        raise TypeError(f"exit_rule must be None, an ExitRule or a name in EXIT_RULES, got {type(exit_rule).__name__}")
    if exit_rule is not None and "gates" in exit_rule.needs and model.exit_gate is None:
        raise ValueError(f"{type(exit_rule).__name__} reads the exit gate, and this model was built without "
                         f"one: use LoopLMConfig(..., exit_gate=True) or another rule")
    return n_loops, stops, exit_rule

# --- book/06_inference.py, cell 22 ---
def choose_tokens(logits, temperature=0.0, top_k=None, generator=None):
    """logits [R, V] -> token ids [R]: argmax if temperature == 0, else a tempered top-k draw."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)

# --- book/06_inference.py, cell 24 ---
def _readout(model, h, cos, sin, attend_for, last_only=False):
    """(logits, z) like model.readout, with the coda attending through attend_for(j)."""
    for j, block in enumerate(model.coda):
        h = block(h, cos, sin, attend_for(j))
    z = model.norm(h[:, -1:] if last_only else h)
    return model.lm_head(z), z


def _prefill(model, cache, prompt, positions, n_steps):
    """Fill the cache from the prompt [B, Tp]; -> per-step logits [S, B, V], gates [S, B] or None,
    hidden [S, B, D] of the last column."""
    cos, sin = model.rope.cos[positions], model.rope.sin[positions]       # (B, Tp, hs/2)
    x0 = model.embed(prompt)                                              # (B, Tp, D)
    for i, block in enumerate(model.prelude):
        x0 = block(x0, cos, sin, cache.prefill_attend("prelude", i, 1))
    h = model.init_state(x0)
    logits, gates, hidden = [], [], []
    for s in range(1, n_steps + 1):
        h = model.injection(h, x0)
        for l, block in enumerate(model.core):
            h = block(h, cos, sin, cache.prefill_attend("core", l, s))
        step_logits, z = _readout(model, h, cos, sin, lambda j: cache.prefill_attend("coda", j, s), last_only=True)
        logits.append(step_logits[:, 0])
        hidden.append(h[:, -1])
        if model.exit_gate is not None:
            gates.append(model.exit_gate(z)[:, 0])
    return torch.stack(logits), (torch.stack(gates) if gates else None), torch.stack(hidden)

# --- book/06_inference.py, cell 26 ---
def _decode_position(model, cache, tokens, positions, rows, rule, n_steps):
    """Run one new token per row; -> (logits [R, V] at each token's exit step, steps [R] from 1).

    tokens, positions [R]; rows: the batch rows they belong to (None: all rows, in order).
    """
    R = tokens.shape[0]
    cos, sin = model.rope.cos[positions][:, None], model.rope.sin[positions][:, None]   # (R, 1, hs/2)
    x0 = model.embed(tokens)[:, None]                                                   # (R, 1, D)
    for i, block in enumerate(model.prelude):
        x0 = block(x0, cos, sin, cache.decode_attend("prelude", i, 1, rows))
    h = model.init_state(x0)
    out_logits = torch.empty(R, model.config.vocab_size, device=tokens.device)
    out_steps = torch.full((R,), n_steps, dtype=torch.long, device=tokens.device)
    all_rows = torch.arange(cache.batch, device=tokens.device) if rows is None else rows
    live = torch.arange(R, device=tokens.device)              # local indices still running
    sub = rows                                                # their batch rows (None: all)
    need_gate = rule is not None and "gates" in rule.needs
    gates = torch.zeros(n_steps, R, device=tokens.device) if need_gate else None
    prev_logits = prev_hidden = None
    for s in range(1, n_steps + 1):
        h = model.injection(h, x0)
        for l, block in enumerate(model.core):
            h = block(h, cos, sin, cache.decode_attend("core", l, s, sub))
        logits, z = _readout(model, h, cos, sin, lambda j: cache.decode_attend("coda", j, s, sub))
        logits, state = logits[:, 0], h[:, 0]                                           # (r, V), (r, D)
        if s == n_steps:
            stop = torch.ones(live.shape[0], dtype=torch.bool, device=tokens.device)
        elif rule is None:
            stop = torch.zeros(live.shape[0], dtype=torch.bool, device=tokens.device)
        else:
            if need_gate:
                gates[s - 1, live] = model.exit_gate(z)[:, 0]
            view = StepView(step=s, logits=logits, prev_logits=prev_logits,
                            gates=gates[:s, live] if need_gate else None, hidden=state, prev_hidden=prev_hidden)
            stop = rule.stop(view)
        if stop.any():
            leaving = live[stop]
            out_logits[leaving], out_steps[leaving] = logits[stop].float(), s
            if s < n_steps:
                cache.fill_deeper(all_rows[leaving], s)
            keep = ~stop
            if not keep.any():
                break
            live, h, x0, cos, sin = live[keep], h[keep], x0[keep], cos[keep], sin[keep]
            logits, state = logits[keep], state[keep]
            sub = all_rows[live]
        prev_logits, prev_hidden = logits, state
    return out_logits, out_steps

# --- book/06_inference.py, cell 28 ---
@torch.no_grad()
def generate(model, idx, max_new_tokens, *, temperature=0.0, top_k=None, stop_tokens=None, cache="exact",
             exit_rule=None, n_loops=None, pad_id=0, generator=None, record=False):
    """KV-cached decoding of a LoopLM: prefill, then one token at a time. -> GenerationResult.

    idx: LongTensor [B, T] or a list of prompts (lists of ids or 1-D tensors) of any lengths,
    left-padded with pad_id. Defaults: greedy, the exact cache, every step (no early exit).
    cache: "exact", "last", "first", "average" or "mod-K" (decoded tokens only; the prompt is
    always cached per step). exit_rule: None or an ExitRule (looplm.adaptive), per token; a
    token that exits at step e skips steps e+1..S, and its entries for those steps are copies
    of its step-e entries. stop_tokens: ids that end a row (kept in the output).
    """
    n_steps, stops, rule = _check_generate_args(model, max_new_tokens, temperature, top_k, stop_tokens,
                                                exit_rule, n_loops, pad_id)
    strategy = cache_strategy(cache)
    c = model.config
    prompt, lengths = _prompt_batch(idx, c.vocab_size, pad_id, c.max_seq_len - max_new_tokens)
    device = next(model.parameters()).device
    prompt, lengths = prompt.to(device), lengths.to(device)
    B, Tp = prompt.shape
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    steps = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    all_logits = torch.zeros((B, max_new_tokens, c.vocab_size), device=device)
    mask = torch.arange(Tp, device=device)[None] >= (Tp - lengths)[:, None]           # (B, Tp) real columns
    kv = LoopKVCache(model, strategy, mask, max(max_new_tokens - 1, 0), n_steps, record=record)
    seconds = {"prefill": 0.0, "decode": 0.0}
    if max_new_tokens == 0:
        return GenerationResult(prompt, steps, all_logits, lengths, kv.nbytes(), strategy.name, seconds, kv)

    start = time.perf_counter()
    positions = (torch.arange(Tp, device=device)[None] - (Tp - lengths)[:, None]).clamp_min(0)   # (B, Tp)
    step_logits, gates, hidden = _prefill(model, kv, prompt, positions, n_steps)
    if rule is None:
        first_steps = torch.full((B,), n_steps, dtype=torch.long, device=device)
    else:
        first_steps = exit_steps(rule, logits=step_logits, gate=gates, hidden=hidden)
    logits = step_logits[first_steps - 1, torch.arange(B, device=device)].float()      # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    active = torch.arange(B, device=device)
    seconds["prefill"] = time.perf_counter() - start

    start = time.perf_counter()
    for n in range(max_new_tokens):
        if n > 0:
            rows = None if active.numel() == B else active
            logits, used = _decode_position(model, kv, tokens[active, n - 1], lengths[active] + n - 1,
                                            rows, rule, n_steps)
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
    return GenerationResult(torch.cat([prompt, tokens], dim=1), steps, all_logits, lengths, kv.nbytes(),
                            strategy.name, seconds, kv)

# --- book/06_inference.py, cell 37 ---
class _ModelOnly:
    """What save_checkpoint needs from a trainer, for a model without one."""

    def __init__(self, model):
        self.model, self.config = model, None

    def state_dict(self):
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}


def save_model(path, model, extra=None):
    """Write `model` (a LoopLM), its config and the looplm version to `path`, atomically. -> path."""
    if not isinstance(model, LoopLM):
        raise TypeError(f"model must be a LoopLM, got {type(model).__name__}")
    return save_checkpoint(path, _ModelOnly(model), extra=extra)


def load_model(path, model=None, map_location="cpu"):
    """The LoopLM stored at `path` (by save_model or python -m looplm.train), built from its config,
    or loaded into `model` after checking that its config is the stored one. CheckpointError otherwise."""
    payload = read_checkpoint(path, map_location)
    model = checkpoint_model(path, payload, model)
    try:
        model.load_state_dict(payload["trainer"]["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path} holds no usable weights for this config: {str(e)[:200]}") from e
    return model

# --- book/06_inference.py, cell 40 ---
RULE_DEFAULTS = {"q_exit": 0.5, "confidence": 0.9, "kl": 5e-4, "hidden_change": 0.03, "fixed": 2}


def _parser():
    p = argparse.ArgumentParser(prog="python -m looplm.generate",
                                description="Complete prompts with a saved looped LM (KV cache, per-token exit).")
    p.add_argument("--checkpoint", required=True, help="a file written by save_model or python -m looplm.train")
    p.add_argument("--prompt", action="append", required=True, help="a prompt in the task vocabulary (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="at most this many new tokens (default: as many as the model's context allows)")
    p.add_argument("--cache", default="exact", help="exact, last, first, average or mod-K (default exact)")
    p.add_argument("--exit-rule", default="none", choices=["none", *EXIT_RULES], help="per-token exit (default none)")
    p.add_argument("--exit-threshold", type=float, default=None, help="the rule's threshold (default RULE_DEFAULTS)")
    p.add_argument("--min-steps", type=int, default=1)
    p.add_argument("--n-loops", type=int, default=None, help="loop steps (default: the model's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def _rule_from_args(args):
    if args.exit_rule == "none":
        return None
    threshold = RULE_DEFAULTS[args.exit_rule] if args.exit_threshold is None else args.exit_threshold
    if args.exit_rule == "fixed":
        threshold = int(threshold)
    return make_exit_rule(args.exit_rule, threshold, min_steps=args.min_steps)


def main(argv=None):
    """python -m looplm.generate --help. Returns an exit status."""
    args = _parser().parse_args(argv)
    vocab = TASK_VOCAB
    try:
        cache_strategy(args.cache)
        rule = _rule_from_args(args)
        prompts = [vocab.encode(p) for p in args.prompt]
        model = load_model(args.checkpoint)
        room = model.config.max_seq_len - max((len(p) for p in prompts), default=0)
        max_new = max(room, 0) if args.max_new_tokens is None else args.max_new_tokens
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

# --- book/06_inference.py, cell 41 ---
if __name__ == "__main__" and "get_ipython" not in globals() and globals().get("__spec__") is not None:
    sys.exit(main())
