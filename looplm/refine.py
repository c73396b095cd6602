# Generated from book/06_other_ways_to_stop.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['encode_answer_slots', 'RecursiveConfig', 'RecursiveOutput', 'RecursiveReasoner', 'deep_supervision_step', 'recursive_predict']
# fmt: on

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from looplm.block import NORM_STYLES, Block, RMSNorm, RotaryEmbedding
from looplm.checks import require_int, require_number
from looplm.data import IGNORE_INDEX, TASK_VOCAB, Example, TaskBatch, answer_accuracy

# --- book/06_other_ways_to_stop.py:504 (cell 36) ---
def encode_answer_slots(examples, n_slots, vocab=TASK_VOCAB, seq_len=None):
    """Batch examples for whole-answer prediction: [pads] prompt [n_slots blanks].

    idx [B, L]: the prompt, left-padded, then n_slots pad tokens (the slots); targets [B, L]: the
    answer and the end token at the first slots, IGNORE_INDEX elsewhere. L = seq_len or the
    longest prompt + n_slots. -> TaskBatch.
    """
    if isinstance(examples, Example) or not examples or not all(isinstance(e, Example) for e in examples):
        raise ValueError("examples must be a non-empty list of Example")
    require_int("n_slots", n_slots, 1)
    needed = max(len(e.prompt) for e in examples) + n_slots
    length = needed if seq_len is None else require_int("seq_len", seq_len, needed)
    idx = torch.full((len(examples), length), vocab.pad_id, dtype=torch.long)        # (B, L)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)    # (B, L)
    for row, example in enumerate(examples):
        prompt, answer = vocab.encode(example.prompt), vocab.encode(example.answer) + [vocab.eos_id]
        if len(answer) > n_slots:
            raise ValueError(f"the answer of {example.prompt!r} needs {len(answer)} slots (with its "
                             f"end token), more than n_slots={n_slots}")
        start = length - n_slots
        idx[row, start - len(prompt):start] = torch.tensor(prompt)
        targets[row, start:start + len(answer)] = torch.tensor(answer)
    return TaskBatch(idx, targets, torch.tensor([e.difficulty for e in examples]))

# --- book/06_other_ways_to_stop.py:535 (cell 38) ---
@dataclass(frozen=True)
class RecursiveConfig:
    """A TRM-style recursive reasoner: f = n_layers Blocks; n_latent updates of z per update of
    y; n_cycles recursions per supervision step (the first n_cycles - 1 without gradients)."""

    vocab_size: int
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    n_latent: int = 6            # n
    n_cycles: int = 3            # T
    max_supervision: int = 16    # N_sup
    halt_weight: float = 0.5
    max_seq_len: int = 64
    norm_style: str = "pre"
    init_std: float = 0.02

    def __post_init__(self):
        for name, low in (("vocab_size", 1), ("d_model", 1), ("n_heads", 1), ("n_layers", 1),
                          ("n_latent", 1), ("n_cycles", 1), ("max_supervision", 1), ("max_seq_len", 1)):
            require_int(name, getattr(self, name), low)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"n_heads must divide d_model into heads of even size, got "
                             f"d_model={self.d_model}, n_heads={self.n_heads}")
        require_number("halt_weight", self.halt_weight, low=0)
        require_number("init_std", self.init_std, low=0, low_open=True)
        if self.norm_style not in NORM_STYLES:
            raise ValueError(f"norm_style must be one of {NORM_STYLES}, got {self.norm_style!r}")


@dataclass
class RecursiveOutput:
    logits: torch.Tensor       # [B, L, V] read out from the answer state y
    halt_logit: torch.Tensor   # [B] the halting head's logit q: halt when sigmoid(q) >= threshold
    carry: tuple               # (y, z) [B, L, D] each, detached: the next supervision step's start


class RecursiveReasoner(nn.Module):
    """TRM-style recursive refinement: model(idx, carry=None) runs one supervision step."""

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, RecursiveConfig):
            raise TypeError(f"config must be a RecursiveConfig, got {type(config).__name__}")
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.rope = RotaryEmbedding(c.d_model // c.n_heads, c.max_seq_len)
        self.blocks = nn.ModuleList(Block(c.d_model, c.n_heads, None, c.norm_style) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.halt_head = nn.Linear(c.d_model, 1)
        self.y_init = nn.Parameter(torch.zeros(c.d_model))
        self.z_init = nn.Parameter(torch.zeros(c.d_model))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=c.init_std)
        nn.init.zeros_(self.halt_head.bias)
        nn.init.normal_(self.y_init, std=c.init_std)
        nn.init.normal_(self.z_init, std=c.init_std)

    def f(self, h, cos, sin):
        for block in self.blocks:
            h = block(h, cos, sin)
        return h

    def recursion(self, x, y, z, cos, sin):
        """One recursion: n_latent updates z <- f(z + y + x), then y <- f(y + z)."""
        for _ in range(self.config.n_latent):
            z = self.f(z + y + x, cos, sin)
        return self.f(y + z, cos, sin), z

    def forward(self, idx, carry=None):
        c = self.config
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.ndim != 2:
            raise ValueError(f"idx must be a LongTensor [B, L], got {getattr(idx, 'dtype', type(idx).__name__)}")
        if idx.shape[1] > c.max_seq_len or idx.min() < 0 or idx.max() >= c.vocab_size:
            raise ValueError(f"idx must hold ids in [0, {c.vocab_size}) and at most {c.max_seq_len} positions")
        cos, sin = self.rope(idx.shape[1])
        x = self.embed(idx)                                            # (B, L, D)
        if carry is None:
            y, z = self.y_init.expand_as(x), self.z_init.expand_as(x)
        else:
            y, z = carry
        with torch.no_grad():                                          # T - 1 recursions, no gradient
            for _ in range(c.n_cycles - 1):
                y, z = self.recursion(x, y, z, cos, sin)
        y, z = self.recursion(x, y, z, cos, sin)                       # the last one with gradient
        h = self.norm(y)
        return RecursiveOutput(self.lm_head(h), self.halt_head(h[:, -1]).squeeze(-1),
                               (y.detach(), z.detach()))

# --- book/06_other_ways_to_stop.py:633 (cell 40) ---
def deep_supervision_step(model, optimizer, idx, targets, grad_clip=1.0):
    """Train a RecursiveReasoner on one batch with deep supervision. -> list of per-step metrics."""
    c, mask, carry, records = model.config, targets != IGNORE_INDEX, None, []
    if not mask.any(-1).all():
        raise ValueError("every row of targets needs at least one answer position")
    for step in range(1, c.max_supervision + 1):
        out = model(idx, carry)
        answer_loss = F.cross_entropy(out.logits[mask], targets[mask])
        correct = answer_accuracy(out.logits.detach(), targets).float()              # (B,)
        halt_loss = F.binary_cross_entropy_with_logits(out.halt_logit, correct)
        loss = answer_loss + c.halt_weight * halt_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        carry = out.carry
        records.append({"step": step, "loss": answer_loss.item(), "halt_loss": halt_loss.item(),
                        "accuracy": correct.mean().item()})
    return records

# --- book/06_other_ways_to_stop.py:660 (cell 42) ---
def recursive_predict(model, idx, max_supervision=None, halt_threshold=0.5):
    """-> (logits [B, L, V] at each sample's halting step, steps LongTensor [B] from 1).

    A sample halts at the first supervision step with sigmoid(halt_logit) >= halt_threshold,
    else at max_supervision (default: the config's).
    """
    n_max = model.config.max_supervision if max_supervision is None else require_int("max_supervision", max_supervision, 1)
    halt_threshold = require_number("halt_threshold", halt_threshold, low=0, high=1)
    carry, chosen, steps = None, None, None
    with torch.no_grad():
        for step in range(1, n_max + 1):
            out = model(idx, carry)
            carry = out.carry
            if chosen is None:
                chosen = out.logits.clone()
                steps = torch.full((idx.shape[0],), n_max, dtype=torch.long, device=idx.device)
                running = torch.ones(idx.shape[0], dtype=torch.bool, device=idx.device)
            chosen[running] = out.logits[running]                     # running samples take the new answer
            halts = running & ((out.halt_logit.sigmoid() >= halt_threshold) | (step == n_max))
            steps[halts] = step
            running = running & ~halts
            if not running.any():
                break
    return chosen, steps
