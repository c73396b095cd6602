# Generated from book/03_fixed_loops.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['TrainConfig', 'lr_at', 'default_loss', 'Trainer', 'train', 'task_batches', 'task_accuracy', 'evaluate_tasks']
# fmt: on

# --- book/03_fixed_loops.py, cell 56 ---
import contextlib
import copy
import dataclasses
import math
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from looplm.data import TASK_VOCAB, Example, TaskBatch, TaskSplits, answer_accuracy, encode_examples
from looplm.model import _require_bool, _require_int, _require_number

# --- book/03_fixed_loops.py, cell 57 ---
def _require_range(name, value, low, high, high_inclusive=True):
    """ValueError unless `value` is a finite number in [low, high] (or [low, high))."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and low <= value and (value <= high if high_inclusive else value < high))
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be a finite number in [{low}, {high}{bracket}, got {value!r}")


@dataclass
class TrainConfig:
    """How to train: schedule, optimizer, clipping, evaluation, seed, device.

    Validated when made (ValueError naming the field, its value and the allowed range).
    """

    steps: int = 500             # optimizer updates in the whole run
    batch_size: int = 32         # rows per batch; get_batch must return exactly this many
    lr: float = 3e-3             # peak learning rate, reached after warmup
    min_lr: float = 3e-4         # learning rate at the last step (cosine decay)
    warmup_steps: int = 50       # linear warmup from 0, in [0, steps)
    weight_decay: float = 0.1    # AdamW decay of weight matrices (not norms, biases, embeddings)
    betas: tuple = (0.9, 0.95)   # AdamW betas
    grad_clip: float = 1.0       # clip the global gradient norm to this (math.inf: never clip)
    eval_every: int = 100        # evaluate every this many steps and at the last (0: never)
    seed: int = 0                # seeds the batch generator
    device: str = "cpu"          # "cpu", "cuda", "cuda:1", ...
    autocast: bool = True        # bf16 autocast on CUDA only; ignored on CPU
    progress: bool = True        # tqdm bar on stderr; off when TQDM_DISABLE or CI is set

    def __post_init__(self):
        _require_int("steps", self.steps, 1)
        _require_int("batch_size", self.batch_size, 1)
        _require_number("lr", self.lr, 0)
        _require_range("min_lr", self.min_lr, 0, self.lr)
        _require_int("warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps must be an int in [0, steps={self.steps}), "
                             f"got {self.warmup_steps!r}")
        _require_range("weight_decay", self.weight_decay, 0, math.inf)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise ValueError(f"betas must be a tuple of two numbers in [0, 1), got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            _require_range(f"betas[{i}]", beta, 0, 1, high_inclusive=False)
        if (isinstance(self.grad_clip, bool) or not isinstance(self.grad_clip, (int, float))
                or not self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a number > 0 (math.inf: no clipping), got {self.grad_clip!r}")
        _require_int("eval_every", self.eval_every, 0)
        _require_int("seed", self.seed, 0)
        _require_bool("autocast", self.autocast)
        _require_bool("progress", self.progress)
        _check_device(self.device)


def _check_device(device):
    try:
        parsed = torch.device(device) if isinstance(device, str) else None
    except RuntimeError:
        parsed = None
    if parsed is None:
        raise ValueError(f"device must be a device string such as 'cpu' or 'cuda', got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but CUDA is not available on this machine; use 'cpu'")

# --- book/03_fixed_loops.py, cell 61 ---
def lr_at(step, config):
    """The learning rate of update number `step` (1 = the first): linear warmup, cosine decay.

    0 at step 0, config.lr at step warmup_steps, config.min_lr at step config.steps and after.
    """
    _require_int("step", step, 0)
    c = config
    if step < c.warmup_steps:
        return c.lr * step / c.warmup_steps
    if step >= c.steps:
        return c.min_lr
    progress = (step - c.warmup_steps) / (c.steps - c.warmup_steps)
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * progress))

# --- book/03_fixed_loops.py, cell 65 ---
def default_loss(model, idx, targets):
    """model(idx, targets=targets).loss: the last step's mean cross-entropy. -> (loss, {})."""
    return model(idx, targets=targets).loss, {}

# --- book/03_fixed_loops.py, cell 67 ---
def _param_groups(model, weight_decay):
    """AdamW groups: decay for matrices, none for norm gains, biases and embedding tables."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():                          # each tensor once, tied ones too
        if not param.requires_grad:
            continue
        if param.ndim >= 2 and id(param) not in embeddings:
            decay.append(param)
        else:
            no_decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]

# --- book/03_fixed_loops.py, cell 71 ---
def _check_batch(batch, batch_size):
    """(idx, targets) from get_batch: integer tensors of the same shape [batch_size, T]."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"get_batch must return a pair (idx, targets), got {type(batch).__name__}")
    for name, tensor in zip(("idx", "targets"), batch):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"get_batch returned {name} of type {type(tensor).__name__}; "
                            f"expected a torch.Tensor of token ids")
        if tensor.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"get_batch returned {name} of dtype {tensor.dtype}; token ids must be "
                            f"an integer tensor (torch.long)")
    idx, targets = batch
    if idx.ndim != 2 or targets.shape != idx.shape:
        raise ValueError(f"get_batch must return idx and targets of the same shape [B, T], got "
                         f"{list(idx.shape)} and {list(targets.shape)}")
    if idx.shape[0] != batch_size:
        raise ValueError(f"get_batch returned {idx.shape[0]} rows but config.batch_size={batch_size}")
    return idx, targets


def _check_metrics(metrics, reserved):
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict of str -> number, got {type(metrics).__name__}")
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or key in reserved:
            raise ValueError(f"metric name {key!r} is not allowed (a str, not one of {sorted(reserved)})")
        out[key] = float(value)
    return out


def _progress_enabled(config):
    off = {"", "0", "false", "False"}
    return (config.progress and os.environ.get("TQDM_DISABLE", "") in off
            and os.environ.get("CI", "") in off)

# --- book/03_fixed_loops.py, cell 73 ---
class Trainer:
    """Trains `model` on batches from `get_batch(generator) -> (idx, targets)`.

    loss_fn(model, idx, targets) -> (loss, metrics dict); evaluate(model) -> dict of numbers,
    run under torch.no_grad() in eval mode every config.eval_every steps and at config.steps.
    `history` has one row per step: {"step", "lr", "loss", "grad_norm", **metrics, "eval_<name>"...}.
    AdamW decays weight matrices only (not norm gains, biases or embedding tables).
    """

    def __init__(self, model, get_batch, config, loss_fn=default_loss, evaluate=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        for name, fn in (("get_batch", get_batch), ("loss_fn", loss_fn)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if evaluate is not None and not callable(evaluate):
            raise TypeError(f"evaluate must be callable or None, got {type(evaluate).__name__}")
        self.config, self.get_batch, self.loss_fn, self.evaluate = config, get_batch, loss_fn, evaluate
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr,
                                           betas=config.betas)
        self.generator = torch.Generator().manual_seed(config.seed)   # batches are drawn on the CPU
        self.step = 0
        self.history = []

    def _autocast(self):
        if self.device.type == "cuda" and self.config.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self):
        c, step = self.config, self.step + 1
        lr = lr_at(step, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        idx, targets = _check_batch(self.get_batch(self.generator), c.batch_size)
        idx, targets = idx.to(self.device), targets.to(self.device)
        with self._autocast():
            loss, metrics = self.loss_fn(self.model, idx, targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return (scalar loss tensor, metrics), got {type(loss).__name__}")
        metrics = _check_metrics(metrics, {"step", "lr", "loss", "grad_norm"})
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"step {step}: the loss is {loss_value}; no update was applied "
                                     f"(the model and optimizer are as after step {step - 1})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip).item()
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"step {step}: the gradient norm is {grad_norm}; no update was "
                                     f"applied (the model and optimizer are as after step {step - 1})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        return {"step": step, "lr": lr, "loss": loss_value, "grad_norm": grad_norm, **metrics}

    def _evaluate(self):
        self.model.eval()
        try:
            with torch.no_grad():
                results = self.evaluate(self.model)
        finally:
            self.model.train()
        if not isinstance(results, dict):
            raise TypeError(f"evaluate must return a dict of str -> number, got {type(results).__name__}")
        return {f"eval_{name}": value for name, value in _check_metrics(results, set()).items()}

    def run(self, until=None):
        """Train up to step `until` (default config.steps); returns self.history."""
        c = self.config
        until = c.steps if until is None else until
        _require_int("until", until, self.step)
        self.model.train()
        with tqdm(total=until - self.step, desc="train", file=sys.stderr,
                  disable=not _progress_enabled(c)) as bar:
            while self.step < until:
                row = self._train_step()
                if self.evaluate is not None and c.eval_every and (
                        self.step % c.eval_every == 0 or self.step == c.steps):
                    row.update(self._evaluate())
                self.history.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        return self.history

    def state_dict(self):
        """A snapshot: model, optimizer, step, history, batch generator and torch RNG states."""
        cuda = self.device.type == "cuda"
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "step": self.step,
            "history": copy.deepcopy(self.history),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
            "config": dataclasses.asdict(self.config),
        }

    def load_state_dict(self, state):
        """Restore a snapshot from state_dict(): training then continues exactly as it would have."""
        needed = ("model", "optimizer", "step", "history", "generator", "torch_rng", "cuda_rng")
        missing = [k for k in needed if not isinstance(state, dict) or k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}; pass what Trainer.state_dict() returned")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.history = copy.deepcopy(state["history"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)


def train(model, get_batch, config, **kwargs):
    """Trainer(model, get_batch, config, **kwargs).run(); returns the trainer."""
    trainer = Trainer(model, get_batch, config, **kwargs)
    trainer.run()
    return trainer

# --- book/03_fixed_loops.py, cell 75 ---
def task_batches(examples, batch_size, seq_len=None, vocab=TASK_VOCAB):
    """get_batch(generator) -> (idx, targets) [batch_size, T]: rows drawn from `examples`.

    `examples` is a list of Example or a TaskSplits (its train split is used); they are encoded
    once by encode_examples (padded to seq_len, or to the longest example).
    """
    if isinstance(examples, TaskSplits):
        examples = examples.train
    _require_int("batch_size", batch_size, 1)
    encoded = encode_examples(examples, vocab, seq_len)
    n_examples = encoded.idx.shape[0]

    def get_batch(generator):
        rows = torch.randint(0, n_examples, (batch_size,), generator=generator)   # (B,)
        return encoded.idx[rows], encoded.targets[rows]                           # (B, T) each

    return get_batch

# --- book/03_fixed_loops.py, cell 77 ---
def _batch_accuracy(model, batch, n_loops, batch_size):
    device = next(model.parameters()).device
    correct = []
    with torch.no_grad():
        for start in range(0, batch.idx.shape[0], batch_size):
            idx = batch.idx[start:start + batch_size].to(device)
            targets = batch.targets[start:start + batch_size].to(device)
            logits = model(idx, n_loops=n_loops).logits                     # (S, b, T, V)
            correct.append(answer_accuracy(logits.float(), targets).cpu())  # (S, b)
    return torch.cat(correct, dim=1).float().mean(dim=1)                    # (S,)


def task_accuracy(model, examples, n_loops=None, batch_size=1024, vocab=TASK_VOCAB):
    """Teacher-forced exact match of each step's readout on `examples` -> [S] float tensor.

    n_loops defaults to the model's own; entry t-1 is the fraction right after step t.
    """
    _require_int("batch_size", batch_size, 1)
    return _batch_accuracy(model, encode_examples(examples, vocab), n_loops, batch_size)


def evaluate_tasks(splits, n_loops=None, batch_size=1024, vocab=TASK_VOCAB):
    """An `evaluate` for Trainer: {"<name>_acc": last-step exact match} for each split.

    `splits` is a TaskSplits (scored on "test" and "ood") or a dict name -> list of Example.
    """
    if isinstance(splits, TaskSplits):
        splits = {"test": splits.test, "ood": splits.ood}
    if not isinstance(splits, dict) or not splits:
        raise TypeError(f"splits must be a TaskSplits or a non-empty dict of name -> examples, "
                        f"got {type(splits).__name__}")
    encoded = {}
    for name, examples in splits.items():
        if not examples:
            raise ValueError(f"split {name!r} has no examples")
        encoded[name] = encode_examples(examples, vocab)
    _require_int("batch_size", batch_size, 1)

    def evaluate(model):
        return {f"{name}_acc": _batch_accuracy(model, batch, n_loops, batch_size)[-1].item()
                for name, batch in encoded.items()}

    return evaluate
