# Generated from book/04a_appendix_engineering.py, book/05a_appendix_adaptive.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['TrainConfig', 'lr_at', 'default_loss', 'OneProcess', 'training_processes', 'Trainer', 'train', 'task_batches', 'task_accuracy', 'evaluate_tasks', 'save_checkpoint', 'load_checkpoint', 'RESUME_MAY_CHANGE', 'Recipe', 'RECIPES', 'write_metrics', 'PARALLEL', 'main', 'train_stage1', 'train_stage2', 'stage2_config', 'train_two_stage']
# fmt: on

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from looplm.adaptive import AdaptiveLoss, GateLoss, gate_only
from looplm.backprop import STEP_WEIGHTS, make_loop_loss
from looplm.checkpoints import (CheckpointError, _atomic_write, _create_temporary, _remove_stale_temporaries,
                                checkpoint_model, read_checkpoint, write_checkpoint)
from looplm.checks import require_bool, require_int, require_number
from looplm.data import (TASKS, TASK_VOCAB, Example, TaskBatch, TaskSplits, answer_accuracy, encode_examples,
                         make_splits, make_task)
from looplm.model import INJECTIONS, LoopLM, LoopLMConfig

# --- book/04a_appendix_engineering.py:141 (cell 8) ---
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
    aux_weight: float = 0.01     # weight of a mixture of experts' balancing loss (chapter 9)

    def __post_init__(self):
        require_int("steps", self.steps, 1)
        require_int("batch_size", self.batch_size, 1)
        require_number("lr", self.lr, 0, low_open=True)
        require_number("min_lr", self.min_lr, 0, self.lr)
        require_int("warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps must be an int in [0, steps={self.steps}), "
                             f"got {self.warmup_steps!r}")
        require_number("weight_decay", self.weight_decay, 0)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise ValueError(f"betas must be a tuple of two numbers in [0, 1), got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            require_number(f"betas[{i}]", beta, 0, 1, high_open=True)
        if (isinstance(self.grad_clip, bool) or not isinstance(self.grad_clip, (int, float))
                or not self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a number > 0 (math.inf: no clipping), got {self.grad_clip!r}")
        require_int("eval_every", self.eval_every, 0)
        require_int("seed", self.seed, 0)
        require_bool("autocast", self.autocast)
        require_bool("progress", self.progress)
        require_number("aux_weight", self.aux_weight, 0)
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

# --- book/04a_appendix_engineering.py:231 (cell 12) ---
def lr_at(step, config):
    """The learning rate of update number `step` (1 = the first): linear warmup, cosine decay.

    0 at step 0, config.lr at step warmup_steps, config.min_lr at step config.steps and after.
    """
    require_int("step", step, 0)
    c = config
    if step < c.warmup_steps:
        return c.lr * step / c.warmup_steps
    if step >= c.steps:
        return c.min_lr
    progress = (step - c.warmup_steps) / (c.steps - c.warmup_steps)
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * progress))

# --- book/04a_appendix_engineering.py:270 (cell 16) ---
def default_loss(model, idx, targets):
    """model(idx, targets=targets).loss: the last step's mean cross-entropy. -> (loss, {})."""
    return model(idx, targets=targets).loss, {}

# --- book/04a_appendix_engineering.py:291 (cell 18) ---
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

# --- book/04a_appendix_engineering.py:339 (cell 22) ---
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

# --- book/04a_appendix_engineering.py:388 (cell 24) ---
class OneProcess:
    """How a Trainer spreads a step over processes: here over one, this one. Every method's
    default is what a single process does; chapter 11's looplm.distributed.DataParallel overrides
    them. `writes`: whether this process writes the run's files."""

    rank, world_size, writes = 0, 1, True

    def prepare(self, trainer):
        """Called once by Trainer.__init__, before the optimizer is built (a strategy may shard the
        model's parameters in place). -> loss_step(idx, targets) -> (loss tensor, metrics dict)."""
        return lambda idx, targets: trainer.loss_fn(trainer.model, idx, targets)

    def shard(self, idx, targets):
        """The global batch [batch_size, T] -> the rows this process trains on."""
        return idx, targets

    def reduce(self, values, targets):
        """{name: number on this process's rows} -> {name: the number for the global batch}."""
        return values

    def after_backward(self, trainer):
        """Called after loss.backward(), before clipping: finish any gradient communication."""

    def clip(self, parameters, max_norm):
        """Clip the global gradient norm to max_norm. -> the norm before clipping (a float)."""
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm).item()

    def state(self, trainer):
        """-> (model state_dict, optimizer state_dict) in the single-process form, as copies."""
        return ({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                copy.deepcopy(trainer.optimizer.state_dict()))

    def load_state(self, trainer, model_state, optimizer_state):
        """Load what state() returned (from this process or from a single-process run)."""
        trainer.model.load_state_dict(model_state)
        trainer.optimizer.load_state_dict(optimizer_state)


_STRATEGIES = [OneProcess()]


@contextlib.contextmanager
def training_processes(strategy):
    """with training_processes(strategy): Trainers built inside (without parallel=) use it."""
    if not isinstance(strategy, OneProcess):
        raise TypeError(f"strategy must be a OneProcess (or a subclass), got {type(strategy).__name__}")
    _STRATEGIES.append(strategy)
    try:
        yield strategy
    finally:
        _STRATEGIES.pop()

# --- book/04a_appendix_engineering.py:450 (cell 26) ---
class Trainer:
    """Trains `model` on batches from `get_batch(generator) -> (idx, targets)`.

    loss_fn(model, idx, targets) -> (loss, metrics dict); evaluate(model) -> dict of numbers,
    run under torch.no_grad() in eval mode every config.eval_every steps and at config.steps.
    `history` has one row per step: {"step", "lr", "loss", "grad_norm", **metrics, "eval_<name>"...}.
    AdamW decays weight matrices only (not norm gains, biases or embedding tables). parallel: a
    OneProcess strategy (default: the innermost training_processes block's, else one process).
    """

    def __init__(self, model, get_batch, config, loss_fn=default_loss, evaluate=None, parallel=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        for name, fn in (("get_batch", get_batch), ("loss_fn", loss_fn)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if evaluate is not None and not callable(evaluate):
            raise TypeError(f"evaluate must be callable or None, got {type(evaluate).__name__}")
        if parallel is not None and not isinstance(parallel, OneProcess):
            raise TypeError(f"parallel must be a OneProcess strategy or None, got {type(parallel).__name__}")
        self.config, self.get_batch, self.loss_fn, self.evaluate = config, get_batch, loss_fn, evaluate
        self.parallel = _STRATEGIES[-1] if parallel is None else parallel
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        self._loss_step = self.parallel.prepare(self)          # may shard the model: before the optimizer
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
        idx, targets = self.parallel.shard(idx, targets)       # this process's rows of the batch
        idx, targets = idx.to(self.device), targets.to(self.device)
        if hasattr(self.model, "last_aux_loss"):
            self.model.last_aux_loss = None                   # this step's forward sets it again
        with self._autocast():
            loss, metrics = self._loss_step(idx, targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return (scalar loss tensor, metrics), got {type(loss).__name__}")
        metrics = _check_metrics(metrics, {"step", "lr", "loss", "grad_norm", "aux_loss"})
        aux = getattr(self.model, "last_aux_loss", None)     # a mixture of experts' balancing loss
        if aux is not None:
            loss = loss + c.aux_weight * aux
            metrics["aux_loss"] = aux.item()
        metrics = self.parallel.reduce({"loss": loss.item(), **metrics}, targets)   # the global batch's
        loss_value = metrics.pop("loss")
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"step {step}: the loss is {loss_value}; no update was applied "
                                     f"(the model and optimizer are as after step {step - 1})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.parallel.after_backward(self)
        grad_norm = self.parallel.clip(self.model.parameters(), c.grad_clip)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"step {step}: the gradient norm is {grad_norm}; no update was "
                                     f"applied (the model and optimizer are as after step {step - 1})")
        self.optimizer.step()
        if hasattr(self.model, "balance_step"):
            self.model.balance_step()                         # bias balancing, once per optimizer step
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
        require_int("until", until, self.step)
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
        model_state, optimizer_state = self.parallel.state(self)
        return {
            "model": model_state,
            "optimizer": optimizer_state,
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
        self.parallel.load_state(self, state["model"], state["optimizer"])
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

# --- book/04a_appendix_engineering.py:602 (cell 28) ---
def task_batches(examples, batch_size, seq_len=None, vocab=TASK_VOCAB):
    """get_batch(generator) -> (idx, targets) [batch_size, T]: rows drawn from `examples`.

    `examples` is a list of Example or a TaskSplits (its train split is used); they are encoded
    once by encode_examples (padded to seq_len, or to the longest example).
    """
    if isinstance(examples, TaskSplits):
        examples = examples.train
    require_int("batch_size", batch_size, 1)
    encoded = encode_examples(examples, vocab, seq_len)
    n_examples = encoded.idx.shape[0]

    def get_batch(generator):
        rows = torch.randint(0, n_examples, (batch_size,), generator=generator)   # (B,)
        return encoded.idx[rows], encoded.targets[rows]                           # (B, T) each

    return get_batch

# --- book/04a_appendix_engineering.py:628 (cell 30) ---
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
    require_int("batch_size", batch_size, 1)
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
    require_int("batch_size", batch_size, 1)

    def evaluate(model):
        return {f"{name}_acc": _batch_accuracy(model, batch, n_loops, batch_size)[-1].item()
                for name, batch in encoded.items()}

    return evaluate

# --- book/04a_appendix_engineering.py:1391 (cell 56) ---
def save_checkpoint(path, trainer, extra=None):
    """Write a Trainer (model config and weights, TrainConfig, optimizer and batch state, loss
    function state) to `path` with write_checkpoint, atomically. -> path. In a multi-process run
    every process calls it (the state may be gathered from all of them); the one whose strategy
    `writes` writes the file."""
    loss_fn = getattr(trainer, "loss_fn", None)
    state = trainer.state_dict()
    if not trainer.parallel.writes:
        return Path(path)
    return write_checkpoint(path, trainer.model, trainer_state=state, train_config=trainer.config,
                            loss_state=loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else None,
                            extra=extra)


def load_checkpoint(path, get_batch, config=None, *, model=None, loss_fn=None, evaluate=None,
                    map_location="cpu", payload=None):
    """A Trainer restored from a checkpoint written by save_checkpoint.

    The model is rebuilt from the stored LoopLMConfig, or `model` is used after checking that its
    config equals the stored one (CheckpointError listing the differences otherwise). config: a
    TrainConfig (default: the stored one). loss_fn (default default_loss) gets its state back if
    it has load_state_dict and the checkpoint holds one. payload: read_checkpoint(path)'s result,
    if the caller has it already (the file is then not read again).
    """
    if payload is None:
        payload = read_checkpoint(path, map_location)
    model = checkpoint_model(path, payload, model)
    if config is None:
        if payload.get("train_config") is None:
            raise CheckpointError(f"{path} stores no TrainConfig; pass config=TrainConfig(...)")
        config = TrainConfig(**payload["train_config"])
    loss_fn = default_loss if loss_fn is None else loss_fn
    trainer = Trainer(model, get_batch, config, loss_fn=loss_fn, evaluate=evaluate)
    trainer.load_state_dict(payload["trainer"])
    if payload.get("loss_fn") is not None and hasattr(loss_fn, "load_state_dict"):
        loss_fn.load_state_dict(payload["loss_fn"])
    return trainer

# --- book/04a_appendix_engineering.py:1659 (cell 68) ---
def _task_splits(args):
    """The command line's TaskSplits: difficulties 1..N for training and testing."""
    options = {"reverse_answer": True} if args.reverse_answer else {}
    if args.reverse_answer and args.task != "addition":
        raise ValueError(f"--reverse-answer applies to the addition task only, not {args.task!r}")
    return make_splits(make_task(args.task, **options), n_train=args.n_train, n_test=args.n_test,
                       max_difficulty=args.difficulty, ood_max_difficulty=args.difficulty + 1,
                       seed=args.seed)

# --- book/04a_appendix_engineering.py:1698 (cell 71) ---
# flags --resume may change: a run saved by one process may go on with several, and back
RESUME_MAY_CHANGE = ("steps", "eval_every", "device", "no_progress", "parallel", "expert_parallel")


def _flag(dest):
    return "--" + dest.replace("_", "-")


@dataclass
class Recipe:
    """A way to train from the command line: `python -m looplm.train --recipe NAME`.

    add_arguments(parser) adds the recipe's own flags (in an argument group);
    run(args, model, get_batch, config, evaluate) trains and returns the Trainer whose model
    and history main() saves. resumable: whether --resume can continue one of its runs (then
    args.resume_from holds read_checkpoint's result for OUT/checkpoint.pt, flags checked).
    A recipe that saves during training calls _save_run(args, trainer).
    """

    help: str
    add_arguments: Callable
    run: Callable
    resumable: bool = False


RECIPES = {}


def _parser():
    """The parser, with every registered recipe's flags; -> (parser, {recipe: its flag dests})."""
    p = argparse.ArgumentParser(
        prog="python -m looplm.train", description="Train a looped LM on one of chapter 0's tasks.",
        epilog="--resume continues the run in --out with the flags it was started with: only "
               + ", ".join(_flag(dest) for dest in RESUME_MAY_CHANGE) + " may differ; any other "
               "difference is an error. Files written: OUT/checkpoint.pt and OUT/metrics.jsonl (one "
               "JSON object per step) after every evaluation, OUT/loss.png at the end.")
    data = p.add_argument_group("data")
    data.add_argument("--task", default="addition", choices=sorted(TASKS))
    data.add_argument("--difficulty", type=int, default=2, help="train and test on difficulties 1..N (default 2)")
    data.add_argument("--reverse-answer", action="store_true", help="addition: answer least significant digit first")
    data.add_argument("--n-train", type=int, default=20000, help="training examples (default 20000)")
    data.add_argument("--n-test", type=int, default=500, help="test examples (default 500)")
    model = p.add_argument_group("model")
    model.add_argument("--n-loops", type=int, default=4, help="loop steps S (default 4)")
    model.add_argument("--d-model", type=int, default=64)
    model.add_argument("--n-heads", type=int, default=4)
    model.add_argument("--n-core", type=int, default=1, help="blocks in the looped core (default 1)")
    model.add_argument("--injection", default="none", choices=sorted(INJECTIONS))
    model.add_argument("--norm-style", default="pre", choices=["pre", "sandwich", "huginn"])
    model.add_argument("--mlp", default="dense", choices=["dense", "moe"],
                       help="moe: a mixture of experts in every block (chapter 9)")
    model.add_argument("--n-experts", type=int, default=8, help="--mlp moe: experts per block (default 8)")
    model.add_argument("--top-k", type=int, default=2, help="--mlp moe: experts per token (default 2)")
    train = p.add_argument_group("training")
    train.add_argument("--recipe", default="standard", choices=sorted(RECIPES),
                       help="; ".join(f"{name}: {r.help}" for name, r in sorted(RECIPES.items())))
    train.add_argument("--steps", type=int, default=2000, help="optimizer steps in total (default 2000)")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    train.add_argument("--warmup-steps", type=int, default=None, help="default: min(50, steps // 10)")
    train.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default steps/10)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    processes = p.add_argument_group("processes (chapter 11; start the command with torchrun)")
    processes.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"],
                           help="data parallel over torchrun's processes: ddp (DistributedDataParallel) or "
                                "fsdp (FSDP2, parameters sharded); --batch-size stays the global batch")
    processes.add_argument("--expert-parallel", action="store_true",
                           help="--mlp moe: each process holds n_experts / world size of every block's experts")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="runs/run",
                     help="folder for checkpoint.pt, metrics.jsonl and loss.png (default runs/run)")
    out.add_argument("--resume", action="store_true",
                     help="continue from OUT/checkpoint.pt, with the same flags except "
                          + ", ".join(_flag(dest) for dest in RESUME_MAY_CHANGE))
    out.add_argument("--no-progress", action="store_true", help="no progress bar (also off when TQDM_DISABLE or CI is set)")
    owned = {}
    for name, recipe in sorted(RECIPES.items()):
        before = {a.dest for a in p._actions}
        recipe.add_arguments(p)
        owned[name] = {a.dest for a in p._actions} - before
    return p, owned


def _reject_foreign_flags(parser, args, owned):
    """A flag of another recipe than the chosen one would be ignored: an error instead."""
    for name, dests in owned.items():
        if name == args.recipe:
            continue
        for dest in sorted(dests):
            if getattr(args, dest) != parser.get_default(dest):
                parser.error(f"{_flag(dest)} belongs to the {name!r} recipe, not {args.recipe!r}")


def _run_flags(parser, args):
    """Every flag's value by its dest, as plain data (str, int, float, bool or None)."""
    return {a.dest: getattr(args, a.dest) for a in parser._actions if a.dest != "help"}


def _shown(value):
    if value is None or value is False:
        return "not set"
    return "set" if value is True else repr(value)


def _check_resumed_flags(parser, args, payload, path, other_recipes=()):
    """ValueError naming each flag whose value differs from the run stored at `path`
    (except RESUME_MAY_CHANGE, and the flags of `other_recipes`, which are at their defaults
    and unused), and if --steps is below the step the run has reached."""
    extra = payload.get("extra")
    stored = extra.get("flags") if isinstance(extra, dict) else None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path} does not record the flags of the run that wrote it (it was not "
                              f"written by python -m looplm.train), so --resume cannot check that it "
                              f"continues the same run; start a new run with another --out")
    differences = []
    for dest, value in args.flags.items():
        if dest in RESUME_MAY_CHANGE or dest in ("out", "resume") or dest in other_recipes:
            continue
        before = stored.get(dest, parser.get_default(dest))      # a flag newer than the run: its default
        if before != value:
            differences.append(f"{_flag(dest)} is {_shown(before)} in the run being resumed, {_shown(value)} here")
    if differences:
        allowed = ", ".join(_flag(dest) for dest in RESUME_MAY_CHANGE)
        raise ValueError("; ".join(differences) + f" (only {allowed} may change on --resume)")
    reached = payload["trainer"].get("step")
    if isinstance(reached, int) and args.steps < reached:
        raise ValueError(f"--steps {args.steps}: the run being resumed is already at step {reached}; "
                         f"pass --steps {reached} or more")

# --- book/04a_appendix_engineering.py:1841 (cell 73) ---
def _standard_arguments(parser):
    loss = parser.add_argument_group("standard recipe: the loss (section 4.7)")
    loss.add_argument("--step-weights", default="last", choices=STEP_WEIGHTS)
    loss.add_argument("--grad-steps", type=int, default=None, help="backpropagate through the last k steps only")
    loss.add_argument("--mean-depth", type=float, default=None, help="randomized depth: Huginn's sampler with this r̄")
    loss.add_argument("--checkpointing", action="store_true", help="activation checkpointing per loop step")
    loss.add_argument("--norm-penalty", type=float, default=0.0)
    loss.add_argument("--consistency", type=float, default=0.0)


def _print_progress(trainer, start, steps):
    recent = [r for r in trainer.history if r["step"] > start]
    line = f"step {trainer.step:>6d}/{steps}  loss {sum(r['loss'] for r in recent) / len(recent):.4f}"
    if "eval_test_acc" in recent[-1]:
        line += f"  test accuracy {recent[-1]['eval_test_acc']:.3f}"
    print(line, flush=True)


def _standard_run(args, model, get_batch, config, evaluate):
    loss_fn = make_loop_loss(step_weights=args.step_weights, grad_steps=args.grad_steps,
                             checkpoint=args.checkpointing, sample_depth=args.mean_depth,
                             norm_penalty=args.norm_penalty, consistency=args.consistency,
                             seed=args.seed)
    checkpoint_path = Path(args.out) / "checkpoint.pt"
    if args.resume:
        trainer = load_checkpoint(checkpoint_path, get_batch, config, model=model, loss_fn=loss_fn,
                                  evaluate=evaluate, payload=args.resume_from)
        args.resume_from = None                         # the trainer holds the state now
        print(f"resumed from {checkpoint_path} at step {trainer.step}", flush=True)
    else:
        trainer = Trainer(model, get_batch, config, loss_fn=loss_fn, evaluate=evaluate)
    while trainer.step < config.steps:
        start = trainer.step
        trainer.run(until=min(config.steps, (start // config.eval_every + 1) * config.eval_every))
        _print_progress(trainer, start, config.steps)
        if trainer.step < config.steps:                 # main saves the final state
            _save_run(args, trainer)
    return trainer


RECIPES["standard"] = Recipe(help="one loss for the whole run, from section 4.7's options",
                             add_arguments=_standard_arguments, run=_standard_run, resumable=True)

# --- book/04a_appendix_engineering.py:1900 (cell 75) ---
def _json_value(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_metrics(path, history):
    """Write `history` (a Trainer's rows) to `path` as JSON lines, one object per row, atomically.

    Non-finite numbers are written as null: the file is valid JSON throughout. -> path.
    """
    lines = [json.dumps({key: _json_value(value) for key, value in row.items()}, allow_nan=False) + "\n"
             for row in history]
    return _atomic_write(path, lambda f: f.write("".join(lines).encode("utf-8")))


def _save_run(args, trainer):
    """OUT/checkpoint.pt (with the run's flags), then OUT/metrics.jsonl. Every process of a
    multi-process run calls it; the one that writes (rank 0) writes both."""
    out = Path(args.out)
    save_checkpoint(out / "checkpoint.pt", trainer, extra={"argv": args.argv, "flags": args.flags})
    if trainer.parallel.writes:
        write_metrics(out / "metrics.jsonl", trainer.history)


def _plot_history(history, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    ax.plot([r.get("step", i + 1) for i, r in enumerate(history)], [r["loss"] for r in history],
            linewidth=0.8, label="training loss")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="python -m looplm.train")
    evaluations = [(r["step"], r["eval_test_acc"]) for r in history if "eval_test_acc" in r]
    if evaluations:
        twin = ax.twinx()
        twin.plot(*zip(*evaluations), "o-", color="C1", label="test accuracy")
        twin.set(ylabel="test exact match", ylim=(0, 1))
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))

# --- book/04a_appendix_engineering.py:1964 (cell 77) ---
def _out_of_memory(error):
    """Whether `error` says that an allocation failed (CPU or GPU)."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("out of memory", "can't allocate memory", "not enough memory"))


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _build_model(model_config, args):
    """LoopLM(model_config), or a ValueError naming the flags if it does not fit in memory."""
    try:
        return LoopLM(model_config)
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise
        raise ValueError(f"the model of --d-model {args.d_model} and --n-core {args.n_core} does not fit in "
                         f"this machine's memory ({_first_line(e)}); use a smaller --d-model or --n-core") from e


def _prepare_out(out):
    """Create the --out folder, check that a file can be written in it (ValueError naming it if
    not), and delete what interrupted writes of the run's files left behind."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = _create_temporary(out / "write-check")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out {out} is not a folder this process can write to "
                         f"({e.strerror or _first_line(e)})") from e
    for name in ("checkpoint.pt", "metrics.jsonl", "loss.png"):
        _remove_stale_temporaries(out / name)


# --parallel NAME -> start(args, model_config): a context manager that joins torchrun's process
# group and yields a OneProcess strategy, leaving the group at the end (chapter 11's
# looplm.distributed registers "ddp" and "fsdp"; `python -m looplm.train` imports it)
PARALLEL = {}


def _processes(args, model_config):
    """The strategy of the run (a context manager): one process, or --parallel's under torchrun."""
    world = os.environ.get("WORLD_SIZE")
    if args.expert_parallel and model_config.mlp != "moe":
        raise ValueError("--expert-parallel splits a mixture of experts over the processes, and this "
                         "model is dense: add --mlp moe")
    if args.parallel == "none":
        if world not in (None, "1"):
            raise ValueError(f"torchrun started {world} processes, and --parallel is none: each would train "
                             f"the whole run alone and write the same files; pass --parallel ddp or fsdp")
        if args.expert_parallel:
            raise ValueError("--expert-parallel needs several processes: torchrun --nproc_per_node=N "
                             "-m looplm.train ... --parallel ddp --expert-parallel")
        return contextlib.nullcontext(OneProcess())
    if world is None or "RANK" not in os.environ:
        raise ValueError(f"--parallel {args.parallel} runs one process per device, started by torchrun: "
                         f"torchrun --nproc_per_node=2 -m looplm.train ... --parallel {args.parallel} "
                         f"(RANK and WORLD_SIZE are not set in this process)")
    if args.parallel not in PARALLEL:
        raise ValueError(f"--parallel {args.parallel} is registered by looplm.distributed; import it first "
                         f"(python -m looplm.train does)")
    return PARALLEL[args.parallel](args, model_config)


@contextlib.contextmanager
def _quiet_unless(speaks):
    """Standard output discarded unless `speaks`: in a multi-process run, rank 0 alone reports."""
    if speaks:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def main(argv=None):
    """The command line: python -m looplm.train --help. Returns an exit status."""
    parser, owned = _parser()
    args = parser.parse_args(argv)
    _reject_foreign_flags(parser, args, owned)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.flags = _run_flags(parser, args)
    args.resume_from = None
    recipe = RECIPES[args.recipe]
    out = Path(args.out)
    checkpoint_path = out / "checkpoint.pt"
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        if args.resume and not recipe.resumable:
            raise ValueError(f"the {args.recipe!r} recipe cannot resume a run; start a new one")
        if args.resume and not checkpoint_path.exists():
            raise ValueError(f"--resume: there is no {checkpoint_path} to continue")
        if checkpoint_path.exists() and not args.resume:
            raise ValueError(f"{checkpoint_path} exists: pass --resume to continue that run, "
                             f"or choose another --out")
        if args.resume:
            args.resume_from = read_checkpoint(checkpoint_path)
            unused = {dest for name, dests in owned.items() if name != args.recipe for dest in dests}
            _check_resumed_flags(parser, args, args.resume_from, checkpoint_path, unused)
        splits = _task_splits(args)
        seq_len = max(len(e.prompt) + len(e.answer) for e in splits.train + splits.test)
        experts = {"mlp": "moe", "n_experts": args.n_experts, "top_k": args.top_k} if args.mlp == "moe" else {}
        model_config = LoopLMConfig(
            vocab_size=TASK_VOCAB.vocab_size, d_model=args.d_model, n_heads=args.n_heads,
            n_core=args.n_core, n_loops=args.n_loops, injection=args.injection,
            norm_style=args.norm_style, max_seq_len=seq_len, **experts)
        if args.eval_every is not None and args.eval_every < 1:
            raise ValueError(f"--eval-every must be >= 1, got {args.eval_every}")
        warmup = min(50, args.steps // 10) if args.warmup_steps is None else args.warmup_steps
        with _processes(args, model_config) as strategy, training_processes(strategy), \
                _quiet_unless(strategy.writes):
            train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                       min_lr=args.lr / 10, warmup_steps=warmup,
                                       eval_every=args.eval_every or max(1, args.steps // 10), seed=args.seed,
                                       device=args.device, progress=strategy.writes and not args.no_progress)
            get_batch = task_batches(splits.train, args.batch_size, seq_len)
            evaluate = evaluate_tasks({"test": splits.test})
            torch.manual_seed(args.seed)
            model = _build_model(model_config, args)
            n_params = sum(p.numel() for p in model.parameters())
            print(f"task {args.task} (difficulty 1..{args.difficulty}): {len(splits.train)} train, "
                  f"{len(splits.test)} test examples; model {n_params:,} parameters, {args.n_loops} loops, "
                  f"recipe {args.recipe}" + (f", {strategy}" if strategy.world_size > 1 else ""), flush=True)
            if strategy.writes:
                _prepare_out(out)
            trainer = recipe.run(args, model, get_batch, train_config, evaluate)
            _save_run(args, trainer)
            if trainer.history and strategy.writes:
                _plot_history(trainer.history, out / "loss.png")
            if not strategy.writes:
                return 0
    except (ValueError, TypeError) as e:
        print(f"python -m looplm.train: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"python -m looplm.train: stopped: {e}; the last checkpoint is unchanged", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"python -m looplm.train: stopped: could not write {e.filename or out}: "
              f"{e.strerror or _first_line(e)}; the files in {out} are those of the last complete save",
              file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise
        print(f"python -m looplm.train: stopped: out of memory while training ({_first_line(e)}); try a "
              f"smaller --batch-size, --d-model or --n-loops; the last checkpoint is unchanged", file=sys.stderr)
        return 1
    print(f"wrote {checkpoint_path}, {out / 'metrics.jsonl'} and {out / 'loss.png'}", flush=True)
    return 0

# --- book/05a_appendix_adaptive.py:552 (cell 24) ---
def _require_gated(model):
    if not isinstance(model, LoopLM) or model.exit_gate is None:
        raise ValueError("the two-stage recipe trains an exit gate: build the model with "
                         "LoopLMConfig(..., exit_gate=True)")


def train_stage1(model, get_batch, config, beta=0.1, warm_steps=0, last_weight=0.0, evaluate=None):
    """Stage I: model and gate together for config.steps updates. The first warm_steps train on
    the last step's loss alone; the rest on last_weight * last-step loss + (1 - last_weight) *
    Ouro's Eq. 4 (entropy weight beta). -> the Trainer."""
    _require_gated(model)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    require_int("warm_steps", warm_steps, 0)
    if warm_steps > config.steps:
        raise ValueError(f"warm_steps={warm_steps} is more than the {config.steps} Stage I updates")
    trainer = Trainer(model, get_batch, config, loss_fn=AdaptiveLoss("stage1", beta=beta, last_weight=1.0),
                      evaluate=evaluate)
    trainer.run(until=warm_steps)
    trainer.loss_fn = AdaptiveLoss("stage1", beta=beta, last_weight=last_weight)
    trainer.run()
    return trainer


def train_stage2(model, get_batch, config, k=50.0, gamma=0.005, evaluate=None):
    """Stage II: the gate alone (everything else frozen) on Ouro's Eq. 6. -> the Trainer."""
    _require_gated(model)
    with gate_only(model):                    # the optimizer below holds the gate's parameters only
        trainer = Trainer(model, get_batch, config, loss_fn=GateLoss(k, gamma), evaluate=evaluate)
        trainer.run()
    return trainer


def stage2_config(config, stage2_steps, stage2_lr=1e-2):
    """Stage II's TrainConfig from the run's: stage2_steps updates, peak stage2_lr decaying to a
    tenth of it, a short warmup, and the next batch seed."""
    require_int("stage2_steps", stage2_steps, 1)
    return dataclasses.replace(config, steps=stage2_steps, lr=stage2_lr, min_lr=stage2_lr / 10,
                               warmup_steps=min(stage2_steps - 1, max(1, stage2_steps // 20)),
                               seed=config.seed + 1)


def train_two_stage(model, get_batch, config, stage2_steps, beta=0.1, k=50.0, gamma=0.005,
                    stage2_lr=1e-2, evaluate=None, warm_steps=None, last_weight=0.5):
    """Stage I (train_stage1) for config.steps - stage2_steps updates, then Stage II
    (train_stage2) for stage2_steps updates. warm_steps defaults to half of Stage I.
    -> the Stage II Trainer; its history holds both stages' rows (key "stage": 1 or 2;
    "step" counted through both).
    """
    _require_gated(model)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    require_int("stage2_steps", stage2_steps, 1)
    stage1_steps = config.steps - stage2_steps
    if stage1_steps < 1:
        raise ValueError(f"stage2_steps={stage2_steps} leaves no Stage I update out of "
                         f"config.steps={config.steps}; use stage2_steps < steps")
    warm_steps = stage1_steps // 2 if warm_steps is None else warm_steps
    stage1_config = dataclasses.replace(config, steps=stage1_steps,
                                        warmup_steps=min(config.warmup_steps, stage1_steps - 1))
    stage1 = train_stage1(model, get_batch, stage1_config, beta, warm_steps, last_weight, evaluate)
    stage2 = train_stage2(model, get_batch, stage2_config(config, stage2_steps, stage2_lr), k, gamma, evaluate)
    stage2.history = ([{**row, "stage": 1} for row in stage1.history]
                      + [{**row, "stage": 2, "step": row["step"] + stage1_steps} for row in stage2.history])
    return stage2

# --- book/05a_appendix_adaptive.py:630 (cell 26) ---
def _two_stage_arguments(parser):
    group = parser.add_argument_group("two-stage recipe (chapter 5)")
    group.add_argument("--stage2-steps", type=int, default=None,
                       help="updates of Stage II, the gate alone (default: a fifth of --steps)")
    group.add_argument("--beta", type=float, default=0.1, help="Stage I entropy weight (default 0.1)")
    group.add_argument("--stage2-k", type=float, default=50.0, help="Stage II label slope k (default 50)")
    group.add_argument("--stage2-gamma", type=float, default=0.005,
                       help="Stage II improvement threshold gamma (default 0.005)")
    group.add_argument("--stage2-lr", type=float, default=1e-2, help="Stage II peak learning rate (default 1e-2)")
    group.add_argument("--warm-steps", type=int, default=None,
                       help="Stage I updates on the last step's loss alone (default: half of Stage I)")
    group.add_argument("--last-weight", type=float, default=0.5,
                       help="weight of the last step's loss beside Eq. 4 after the warm steps (default 0.5)")


def _with_gate(model):
    """The model itself if it has an exit gate, else a copy with a fresh gate and the same weights."""
    if model.exit_gate is not None:
        return model
    gated = LoopLM(dataclasses.replace(model.config, exit_gate=True))
    missing, unexpected = gated.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.startswith("exit_gate.") for name in missing):
        raise ValueError(f"cannot add a gate to this model: missing {missing}, unexpected {unexpected}")
    first = next(model.parameters())
    return gated.to(device=first.device, dtype=first.dtype)


def _two_stage_run(args, model, get_batch, config, evaluate):
    stage2_steps = args.stage2_steps if args.stage2_steps is not None else max(1, config.steps // 5)
    trainer = train_two_stage(_with_gate(model), get_batch, config, stage2_steps, beta=args.beta,
                              k=args.stage2_k, gamma=args.stage2_gamma, stage2_lr=args.stage2_lr,
                              evaluate=evaluate, warm_steps=args.warm_steps, last_weight=args.last_weight)
    for stage in (1, 2):
        last = [row for row in trainer.history if row["stage"] == stage][-1]
        mass = " ".join(f"{last[f'mass_{t}']:.2f}" for t in range(1, model.config.n_loops + 1))
        print(f"stage {stage} done at step {last['step']}: last-step loss {last['last_loss']:.4f}, "
              f"exit mass per step [{mass}], E[t] {last['depth']:.2f}", flush=True)
    return trainer


RECIPES["two-stage"] = Recipe(
    help="Ouro's two stages: model and exit gate with an entropy bonus, then the gate alone",
    add_arguments=_two_stage_arguments, run=_two_stage_run)
