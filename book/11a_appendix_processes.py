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
# # Appendix C, continued: the training command line on many processes
#
# Chapter 11 proves each piece of data, sharded and expert parallelism equal to one process, one
# task at a time. This part of Appendix C puts them behind the command line of section C.3:
#
# ```
# torchrun --nproc_per_node=N -m looplm.train ... --parallel ddp|fsdp [--expert-parallel]
# ```
#
# trains the same model as `python -m looplm.train ...` with the same flags, on the same
# global batches (`--batch-size` is always the global batch), and logs the same losses, up to the
# order in which floating-point sums are taken. The run writes the same files, in the
# single-process format, from rank 0: `OUT/checkpoint.pt`, `OUT/metrics.jsonl` and
# `OUT/loss.png`. A run saved by $N$ processes resumes with $M$, or with one.
#
# Its cells extend `looplm/distributed.py` with `DataParallel`, the `OneProcess` strategy
# (section C.1) that the Trainer consults at every step, and add one line to
# `looplm/train/__main__.py`, the import that registers `--parallel ddp` and `--parallel fsdp`.

# %% tags=["hide-input"]
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import contextlib
import copy
import dataclasses
import re
import warnings

import matplotlib.pyplot as plt
import torch
import torch.distributed as dist
from torch import nn

import looplm
from looplm.checkpoints import read_checkpoint
from looplm.distributed import (EXPERT_WEIGHTS, ExpertParallelMoE, Launch, _first_error, _gather_experts_of, _stop,
                                free_port)
from looplm.model import IGNORE_INDEX, LoopLM
from looplm.testing import run_tests

torch.set_num_threads(1)
_ = torch.manual_seed(0)

# %% [markdown]
# ## What a process contributes to a step
#
# One process computes $L = \frac{1}{N}\sum_{i \in \text{batch}} \ell_i$ over the $N$ learned
# tokens of the global batch. Process $r$ holds $B/W$ of its rows and $n_r$ of its learned tokens,
# and its loss function returns the mean over its own tokens, $L_r = \frac{1}{n_r}\sum_{i \in r}
# \ell_i$. The ranks hold different numbers of answer tokens, so the plain average of the $L_r$ is
# not $L$. Process $r$ backpropagates
#
# $$\tilde L_r = \frac{n_r W}{N} L_r, \qquad \frac{1}{W}\sum_r \tilde L_r = \frac{1}{N}\sum_r \sum_{i\in r}
# \ell_i = L,$$
#
# with $N = \sum_r n_r$ all-reduced first. DDP and FSDP average gradients over the $W$ ranks, so
# the averaged gradient is $\nabla L$ exactly. This holds for every loss that is a mean over the
# learned tokens: each step's cross-entropy whatever the step weights, the consistency term, Ouro's
# Stage I and Stage II losses. The hidden-norm penalty is a mean over all positions instead, so
# `--norm-penalty` is refused under `--parallel`. The logged numbers are the global batch's: the
# loss is the mean of the $\tilde L_r$, and each metric $m_r$ (a mean over process $r$'s tokens)
# becomes $\sum_r n_r m_r / N$, all in one all-reduce.
#
# A mixture of experts adds its balancing statistics. Switch's loss $E \sum_i f_i P_i$ multiplies
# two means over all tokens, and a product of per-rank means is not the product of global means.
# So each MoE layer's routing record (chapter 9's `RoutingRecord`: router probabilities, logits,
# choices) is all-gathered after its forward, through an autograd function whose backward
# all-reduces the gradient and keeps this rank's rows. Every rank then computes the global
# balancing loss and counts the global assignments for bias balancing, so the biases stay equal
# on every rank. Randomized depth needs nothing: the depth sampler has its own generator with the
# same seed on every rank, and `DataParallel` checks each step that the ranks drew the same depth.
#
# With `--expert-parallel`, each block's experts are split over the ranks
# (`ExpertParallelLoopMoE`, chapter 11's `ExpertParallelMoE` with the bias balancing of chapter
# 9). An expert's gradient then sums the contributions of every rank's tokens, each rank's loss
# already scaled as above, which is $W$ times the gradient: `after_backward` divides it by $W$.
# DDP (or FSDP) leaves the expert weights alone and averages everything else. Gradient clipping
# needs the global norm: replicated gradients count once, shards and expert slices are summed over
# the ranks. Saving gathers the full state (FSDP's shards, every rank's experts) into the
# single-process checkpoint; resuming slices it again.

# %%
#| export distributed
import functools

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from looplm.backprop import LoopLoss
from looplm.moe import LoopMoE, RoutingRecord
from looplm.train import PARALLEL, OneProcess


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (the same number of rows on every rank). Backward: the gradient is
    all-reduced and this rank's rows are kept, so a loss computed identically on every rank from
    the gathered rows sends each rank the gradient of its own rows, summed over the ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        sent = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()   # gloo has no bool
        parts = [torch.empty_like(sent) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, sent, group=group)
        gathered = torch.cat(parts)
        return gathered.bool() if x.dtype == torch.bool else gathered

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def gather_routing(record, group=None):
    """A RoutingRecord of this rank's tokens -> the record of every rank's tokens, rank by rank
    (probabilities and logits differentiable)."""
    return RoutingRecord(**{field.name: _GatherRows.apply(getattr(record, field.name), group)
                            for field in dataclasses.fields(record)})


def _gather_routing_after_forward(layer, inputs, output):
    if layer.last_routing is not None:
        layer.last_routing = gather_routing(layer.last_routing)


class ExpertParallelLoopMoE(ExpertParallelMoE):
    """Chapter 11's ExpertParallelMoE for a LoopLM block: a LoopMoE's experts split over the
    ranks, with the LoopMoE's bias balancing (pending counts, balance_step)."""

    def __init__(self, moe: LoopMoE, group=None):
        if not isinstance(moe, LoopMoE):
            raise TypeError(f"expected a LoopMoE (a block of LoopLMConfig(mlp='moe')), got {type(moe).__name__}")
        super().__init__(moe, group)
        self.balance, self.bias_rate = moe.balance, moe.bias_rate
        self.register_buffer("pending", moe.pending.detach().clone(), persistent=False)

    balance_step = LoopMoE.balance_step


def _blocks(model):
    return (*model.prelude, *model.core, *model.coda)


def split_experts(model, group=None):
    """Replace every LoopMoE of `model` (a LoopLM, the same weights on every rank) by an
    ExpertParallelLoopMoE, in place. -> model"""
    for block in _blocks(model):
        if isinstance(block.mlp, LoopMoE):
            block.mlp = ExpertParallelLoopMoE(block.mlp, group).to(next(block.parameters()).device)
    return model


def _expert_layers(model):
    return {f"{name}.": m for name, m in model.named_modules() if isinstance(m, ExpertParallelMoE)}


def _unwrapped(name):
    """A parameter name as the single-process LoopLM spells it (FSDP2 and DDP keep names, but a
    wrapper's or checkpointing's prefixes are dropped)."""
    return name.replace("_checkpoint_wrapped_module.", "").removeprefix("module.")

# %% [markdown]
# The strategy itself. `prepare` runs once per Trainer (a two-stage run builds two), so the
# model's sharding and expert split happen the first time only; each Trainer gets its own DDP
# wrapper, built after Stage II has frozen everything but the gate. DDP wraps a small module
# whose `forward` returns the scaled loss tensor, not the model: chapter 11 measured that DDP
# cannot see the tensors inside a `LoopOutput`. A model with an exit gate gets
# `find_unused_parameters=True`: Stage I's first steps train on the last step's loss alone, which
# leaves the gate without a gradient. DDP then leaves its gradients at `None`, as one process
# would, and AdamW skips them in both. (Every other parameter gets a gradient at every step: an
# expert no token chose still takes part, with an empty slice.)

# %% [markdown]
# Checkpoints stay in the single-process format whatever the strategy, so that `looplm.load_model`,
# `python -m looplm.generate` and a one-process `--resume` read them. `state` gathers the full
# weights and AdamW moments (FSDP2's `get_model_state_dict` and `get_optimizer_state_dict` with
# `full_state_dict=True`, every rank's experts with an all-gather) and puts the optimizer's state
# back in the positional form `torch.optim` uses; `load_state` does the reverse. Every rank calls
# both, since both communicate.

# %%
#| export distributed
def _slice_experts(tensor, layer):
    return tensor[layer.first_expert:layer.first_expert + layer.n_local].clone()


class _ShareOfLoss(nn.Module):
    """What DDP wraps: forward(idx, targets) -> this rank's scaled loss, a tensor; the loss
    function's metrics are kept in .metrics."""

    def __init__(self, trainer, strategy):
        super().__init__()
        self.model, self.metrics = trainer.model, {}
        self._trainer, self._strategy = [trainer], strategy     # in lists: not submodules

    def forward(self, idx, targets):
        loss_fn = self._trainer[0].loss_fn
        loss, self.metrics = loss_fn(self.model, idx, targets)
        drawn = isinstance(loss_fn, LoopLoss) and loss_fn.sample_depth is not None
        self._strategy.drawn_depth = self.metrics["depth"] if drawn else None
        return loss * self._strategy.share


class DataParallel(OneProcess):
    """The Trainer strategy of `--parallel ddp|fsdp [--expert-parallel]` (section C.1's OneProcess,
    overridden): each rank trains on its B / W rows of every global batch, its loss scaled by
    n_r W / N (n_r its learned tokens, N the batch's), the logged numbers those of the global
    batch, MoE routing statistics global, the experts split over the ranks when expert_parallel.
    kind: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2's fully_shard per block and on the
    model). Needs an initialised process group; rank 0 writes the files."""

    def __init__(self, kind="ddp", expert_parallel=False):
        if kind not in ("ddp", "fsdp"):
            raise ValueError(f"kind must be 'ddp' or 'fsdp', got {kind!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DataParallel needs an initialised torch.distributed process group")
        self.kind, self.expert_parallel = kind, bool(expert_parallel)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.writes = self.rank == 0
        self.share, self.tokens, self._experts, self.drawn_depth = 1.0, (0, 0), set(), None

    def __repr__(self):
        experts = ", experts split" if self.expert_parallel else ""
        return f"{self.kind} over {self.world_size} processes{experts}"

    def prepare(self, trainer):
        model = trainer.model
        if not isinstance(model, LoopLM):
            raise TypeError(f"DataParallel trains a LoopLM, got {type(model).__name__}")
        if self.expert_parallel and model.config.mlp != "moe":
            raise ValueError("expert parallelism splits a mixture of experts, and this model is dense: "
                             "build it with LoopLMConfig(..., mlp='moe')")
        ready = getattr(model, "_data_parallel_ready", False)    # a second Trainer on the same model
        if not ready:
            if self.expert_parallel:
                split_experts(model)
            for block in _blocks(model):
                if isinstance(block.mlp, (LoopMoE, ExpertParallelMoE)):
                    block.mlp.register_forward_hook(_gather_routing_after_forward)
        self._experts = {id(getattr(layer, name)) for layer in _expert_layers(model).values()
                         for name in EXPERT_WEIGHTS}
        if not ready:
            if self.kind == "fsdp":
                self._shard(model)
            model._data_parallel_ready = True
        objective = _ShareOfLoss(trainer, self)
        if self.kind == "fsdp":
            return lambda idx, targets: (objective(idx, targets), objective.metrics)
        experts = [f"model.{n}" for n, p in model.named_parameters() if id(p) in self._experts]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, experts)
        wrapped = nn.parallel.DistributedDataParallel(objective, find_unused_parameters=model.exit_gate is not None)
        return lambda idx, targets: (wrapped(idx, targets), objective.metrics)

    def _shard(self, model):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (self.world_size,))
        ignored = {p for p in model.parameters() if id(p) in self._experts}
        # the gate is a unit of its own: Stage II runs it alone, after a forward without gradients,
        # and a unit's backward hooks are what make FSDP2 reduce the root's gradients at all
        gate = [] if model.exit_gate is None else [model.exit_gate]
        for unit in (*_blocks(model), *gate):
            fully_shard(unit, mesh=mesh, ignored_params={p for p in unit.parameters() if p in ignored})
        fully_shard(model, mesh=mesh, ignored_params=ignored)

    def shard(self, idx, targets):
        B, W = idx.shape[0], self.world_size
        if B % W:
            raise ValueError(f"the global batch of {B} rows cannot be split over {W} processes; use a "
                             f"--batch-size divisible by {W}")
        mine = slice(self.rank * B // W, (self.rank + 1) * B // W)
        idx, targets = idx[mine], targets[mine]
        counts = torch.tensor([(targets != IGNORE_INDEX).sum().item(), 0])
        total = counts.clone()
        dist.all_reduce(total)
        if counts[0] == 0:
            raise ValueError(f"rank {self.rank}'s rows of the global batch hold no learned token; use a "
                             f"larger --batch-size")
        self.tokens = (int(counts[0]), int(total[0]))
        self.share = self.tokens[0] * W / self.tokens[1]
        return idx, targets

    def reduce(self, values, targets):
        mine, total = self.tokens
        names = list(values)
        local = [values[k] / self.world_size if k == "loss" else values[k] * mine / total for k in names]
        summed = torch.tensor(local, dtype=torch.float64)
        dist.all_reduce(summed)
        if self.drawn_depth is not None:                         # the same randomized depth everywhere
            spread = torch.tensor([self.drawn_depth, -self.drawn_depth], dtype=torch.float64)
            dist.all_reduce(spread, op=dist.ReduceOp.MAX)
            if spread[0] != -spread[1]:
                raise RuntimeError(f"the ranks ran different depths this step ({-spread[1].item():g} to "
                                   f"{spread[0].item():g}); the depth sampler must be seeded alike on every rank")
        return dict(zip(names, summed.tolist()))

    def after_backward(self, trainer):
        for layer in _expert_layers(trainer.model).values():
            for name in EXPERT_WEIGHTS:
                grad = getattr(layer, name).grad
                if grad is not None:
                    grad /= self.world_size          # every rank's scaled loss reached these experts

    def clip(self, parameters, max_norm):
        """Clip to the global norm as clip_grad_norm_ does in one process (coefficient
        max_norm / (norm + 1e-6), at most 1): replicated gradients count once, DTensor shards and
        expert slices are summed over the ranks. -> the norm before clipping"""
        params = [p for p in parameters if p.grad is not None]
        replicated, spread = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for p in params:
            if hasattr(p.grad, "to_local"):
                spread += p.grad.to_local().double().pow(2).sum().cpu()
            elif id(p) in self._experts:
                spread += p.grad.double().pow(2).sum().cpu()
            else:
                replicated += p.grad.double().pow(2).sum().cpu()
        dist.all_reduce(spread)
        norm = (replicated + spread).sqrt().item()
        coefficient = min(1.0, max_norm / (norm + 1e-6))
        if coefficient < 1.0:
            for p in params:
                p.grad.mul_(coefficient)
        return norm

    def _names(self, trainer):
        """The single-process names of the optimizer's parameters, in its order."""
        names = {id(p): _unwrapped(n) for n, p in trainer.model.named_parameters()}
        return [names[id(p)] for group in trainer.optimizer.param_groups for p in group["params"]]

    def _expert_of(self, trainer):
        """{parameter name: its ExpertParallelMoE} for the expert weights."""
        return {f"{prefix}{name}": layer for prefix, layer in _expert_layers(trainer.model).items()
                for name in EXPERT_WEIGHTS}

    def state(self, trainer):
        model, optimizer = trainer.model, trainer.optimizer
        if self.kind == "fsdp":
            options = StateDictOptions(full_state_dict=True)
            weights = get_model_state_dict(model, options=options)
            by_name = get_optimizer_state_dict(model, optimizer, options=options)
            position = {name: i for i, name in enumerate(self._names(trainer))}
            optimizer_state = {
                "state": {position[_unwrapped(n)]: s for n, s in by_name["state"].items()},
                "param_groups": [{**g, "params": [position[_unwrapped(n)] for n in g["params"]]}
                                 for g in by_name["param_groups"]]}
        else:
            weights, optimizer_state = model.state_dict(), optimizer.state_dict()
        weights = {_unwrapped(k): v.detach().clone() for k, v in weights.items()}
        optimizer_state = copy.deepcopy(optimizer_state)
        experts = self._expert_of(trainer)
        for name, layer in experts.items():
            weights[name] = _gather_experts_of({name: weights[name]}, layer)[name]
        for i, name in enumerate(self._names(trainer)):
            if name in experts and i in optimizer_state["state"]:
                moments = optimizer_state["state"][i]
                for key, t in moments.items():
                    if isinstance(t, torch.Tensor) and t.ndim:
                        moments[key] = _gather_experts_of({key: t}, experts[name])[key]
        return weights, optimizer_state

    def load_state(self, trainer, model_state, optimizer_state):
        model, optimizer = trainer.model, trainer.optimizer
        weights, optimizer_state = dict(model_state), copy.deepcopy(optimizer_state)
        experts, names = self._expert_of(trainer), self._names(trainer)
        for name, layer in experts.items():
            weights[name] = _slice_experts(weights[name], layer)
        for i, name in enumerate(names):
            if name in experts and i in optimizer_state["state"]:
                moments = optimizer_state["state"][i]
                for key, t in moments.items():
                    if isinstance(t, torch.Tensor) and t.ndim:
                        moments[key] = _slice_experts(t, experts[name])
        if self.kind != "fsdp":
            model.load_state_dict(weights)
            optimizer.load_state_dict(optimizer_state)
            return
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=options)
        by_name = {"state": {names[i]: s for i, s in optimizer_state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                    for g in optimizer_state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=options)

# %% [markdown]
# `--parallel ddp` and `--parallel fsdp` register a function that checks the flags against the
# world torchrun started, joins the process group (gloo on CPUs, NCCL on GPUs, each process on
# the GPU of its `LOCAL_RANK`), yields the strategy and leaves the group at the end. The checks
# come before the group is joined, so a bad flag stops every process at once with the message.

# %%
#| export distributed
@contextlib.contextmanager
def _start_processes(kind, args, model_config):
    world = int(os.environ["WORLD_SIZE"])
    flag = f"--parallel {kind}"
    if getattr(args, "norm_penalty", 0):
        raise ValueError(f"--norm-penalty is a mean over all positions, not over learned tokens, so the "
                         f"token-count normalisation of {flag} would weight it wrongly; drop one of them")
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is the global batch, and it does not split over the "
                         f"{world} processes torchrun started; use a multiple of {world}")
    if args.expert_parallel and model_config.moe_shape[0] % world:
        raise ValueError(f"--expert-parallel: --n-experts {model_config.moe_shape[0]} does not split over the "
                         f"{world} processes; use a multiple of {world}")
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        with warnings.catch_warnings():
            # FSDP2 warns once that the LoopOutput it returns holds views (its loss, for one): an
            # in-place op on them would skip its hooks. Nothing here modifies an output in place.
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            yield DataParallel(kind, args.expert_parallel)
    finally:
        dist.destroy_process_group()


PARALLEL["ddp"] = functools.partial(_start_processes, "ddp")
PARALLEL["fsdp"] = functools.partial(_start_processes, "fsdp")

# %%
#| export train.__main__
import looplm.distributed  # noqa: F401  (registers --parallel ddp and --parallel fsdp)

# %% [markdown]
# ## Running the command line on many processes
#
# `run_train(flags, nproc)` is what a test or a notebook uses to start the command line:
# `torchrun --nproc_per_node=nproc -m looplm.train FLAGS`, one thread per process, a rendezvous
# on a free local port, and a timeout after which the whole launch is stopped. With `nnodes=2`
# it starts two torchrun launches that meet at one c10d rendezvous, as two machines would: on a
# cluster each machine runs the same command, `--nnodes=2 --rdzv-backend=c10d
# --rdzv-endpoint=HOST:PORT --rdzv-id=JOB`, with HOST one of the machines.

# %%
#| export distributed
def _why_it_failed(log):
    """The reason a torchrun launch failed, from its log: a worker killed by a signal, the
    command line's error message, or the first exception a worker printed."""
    killed = re.findall(r"Signal \d+ \((\w+)\) received by PID (\d+)", log)
    # torchrun stops the other workers with SIGTERM once one has died: name the first other signal
    killed = sorted(killed, key=lambda found: found[0] == "SIGTERM")
    if killed:
        return f": a worker (pid {killed[0][1]}) was killed by {killed[0][0]}"
    said = re.search(r"python -m looplm\.train: (error|stopped): (.*)$", log, flags=re.M)
    return f": {said.group(2)}" if said else _first_error(log)


def run_train(flags, nproc=2, nnodes=1, timeout=300, env=None):
    """torchrun --nnodes=nnodes --nproc_per_node=nproc -m looplm.train FLAGS on this machine, one
    thread per process; nnodes > 1 starts that many launches joining one c10d rendezvous.
    -> Launch(results=[], log, seconds). RuntimeError with the reason and the end of the log if a
    launch fails, or if the launches outlive `timeout` seconds (then they are stopped)."""
    endpoint, launches = f"127.0.0.1:{free_port()}", []
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id=looplm-{os.getpid()}",
               "--max-restarts=0", "-m", "looplm.train", *map(str, flags)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})}
    start = time.perf_counter()
    for _ in range(nnodes):
        launches.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env=environment, start_new_session=True))
    logs, late = [], False
    for process in launches:
        try:
            log, _ = process.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            log, late = _stop(process), True
        logs.append(log)
    log = "\n".join(logs)
    what = f"looplm.train on {nnodes} x {nproc} processes"
    if late:
        for process in launches:
            if process.poll() is None:
                _stop(process)
        raise RuntimeError(f"{what} did not finish within {timeout} s; the end of its log:\n{log[-3000:]}")
    failed = [p.returncode for p in launches if p.returncode != 0]
    if failed:
        raise RuntimeError(f"{what} failed{_why_it_failed(log)} (exit status {failed[0]}); the end of its "
                           f"log:\n{log[-3000:]}")
    return Launch([], log, time.perf_counter() - start)

# %% [markdown]
# ## The same run, one process or many
#
# Two runs, each trained once in one process and then on several. The first is the standard
# recipe with most of chapter 4's options at once: randomized depth ($\bar r = 3$), truncated
# backpropagation through the last 2 steps, activation checkpointing per step, uniform step
# weights and the consistency term, on addition, here run with DDP and with FSDP2. The second is
# a mixture of experts (4 experts per block, 2 per token) trained with Ouro's two stages, its
# experts split over the two processes, under DDP. Everything is float32, so the runs agree up to
# the order of floating-point sums. (The tests below also run FSDP2 with split experts, and DDP on
# two simulated machines: two torchrun launches of one process each, meeting at one c10d
# rendezvous on this machine, as `run_train(..., nnodes=2, nproc=1)` starts them.)

# %%
FLAGS = ["--task", "addition", "--difficulty", "3", "--steps", "12", "--batch-size", "12", "--d-model", "32",
         "--n-heads", "2", "--eval-every", "6", "--n-train", "500", "--n-test", "50", "--no-progress"]
STANDARD = FLAGS + ["--mean-depth", "3", "--grad-steps", "2", "--checkpointing", "--step-weights", "uniform",
                    "--consistency", "0.1"]
EXPERTS = FLAGS + ["--mlp", "moe", "--n-experts", "4", "--recipe", "two-stage", "--stage2-steps", "4"]
RUNS = {"standard recipe": (STANDARD, [("ddp", ["--parallel", "ddp"], 1, 2), ("fsdp", ["--parallel", "fsdp"], 1, 2)]),
        "experts, two stages": (EXPERTS, [("ddp, experts split", ["--parallel", "ddp", "--expert-parallel"], 1, 2)])}


def one_process(flags, out):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "looplm.train", *flags, "--out", str(out)], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    return time.perf_counter() - start


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


scratch = Path(tempfile.mkdtemp())
rows, curves = [], {}
for name, (flags, ways) in RUNS.items():
    seconds = one_process(flags, scratch / name / "one")
    reference = losses(scratch / name / "one")
    curves[name] = {"one process": reference}
    rows.append((name, "one process", 1, len(reference), 0.0, seconds))
    for way, extra, nnodes, nproc in ways:
        launched = run_train(flags + extra + ["--out", scratch / name / way], nproc=nproc, nnodes=nnodes)
        found = losses(scratch / name / way)
        worst = max(abs(a - b) / abs(a) for a, b in zip(reference, found))
        curves[name][way] = found
        rows.append((name, way, nnodes * nproc, len(found), worst, launched.seconds))
print(f"{'run':<20} {'how':<22} {'processes':>9} {'steps':>5} {'largest relative loss difference':>33}")
for name, way, processes, steps, worst, _ in rows:
    print(f"{name:<20} {way:<22} {processes:>9} {steps:>5} {worst:>33.1e}")

# %% tags=["remove-cell"]
assert all(worst <= 1e-5 for *_, worst, _ in rows) and all(steps == 12 for _, _, _, steps, _, _ in rows)

# %% tags=["nbval-ignore-output"]
print("seconds per run, process start-up included: " + ", ".join(f"{way} {s:.1f}" for _, way, _, _, _, s in rows))

# %% [markdown]
# Every multi-process run logs the one-process losses to within about $10^{-7}$, relative, at every
# step: the size of float32 rounding, where the bound is $10^{-5}$. The randomized depth
# drew the same depths on every rank (the strategy checks it each step), the experts' balancing
# loss and bias counts were global, and the gradient norm was clipped globally. The plot shows
# the curves on top of each other, and how far apart they are.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for i, (name, runs) in enumerate(curves.items()):
    reference = runs["one process"]
    axes[0].plot(range(1, len(reference) + 1), reference, color=f"C{i}", linewidth=3, alpha=0.35,
                 label=f"{name}: one process")
    for j, (way, found) in enumerate(runs.items()):
        if way == "one process":
            continue
        axes[0].plot(range(1, len(found) + 1), found, linestyle=":", marker=".", color=f"C{i}")
        gap = [max(abs(a - b) / abs(a), 1e-9) for a, b in zip(reference, found)]
        axes[1].plot(range(1, len(gap) + 1), gap, marker="o.sx^"[j], label=f"{name}: {way}")
axes[0].set(xlabel="optimizer step", ylabel="training loss (global batch)",
            title="one process (thick) and many (dotted)")
axes[0].legend(fontsize=8)
axes[1].axhline(1e-5, color="gray", linestyle="--", linewidth=1)
axes[1].set(yscale="log", xlabel="optimizer step", ylabel="|loss - one process's| / loss",
            title="relative difference (floor 1e-9); dashed: 1e-5")
axes[1].legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Resuming with another number of processes, a killed worker, bad flags
#
# A checkpoint holds the single-process state, so a run may change `--parallel` and
# `--expert-parallel` when it resumes (`RESUME_MAY_CHANGE`, section C.3). The tests below resume
# a one-process run with two DDP processes, with two FSDP2 processes and on two simulated
# machines, each against the one-process run resumed; and they train a mixture of experts for
# three steps with FSDP2 and split experts, check its gathered checkpoint (weights and AdamW
# moments) against one process's, and resume it with DDP and split experts.
#
# A worker that dies stops the run. torchrun sees the dead process, stops the others and exits
# with a failure, and `run_train` names the signal. Rank 0 writes every file atomically (section
# C.2), so what `OUT` holds is the last complete save, whatever moment the kill came at. The test
# below sends SIGKILL to rank 1 of a DDP run right after its first checkpoint appears.
#
# Flags that cannot work stop every process before it joins the group: `--parallel` without
# torchrun, torchrun without `--parallel`, `--expert-parallel` on a dense model, a global batch
# or an expert count that does not split over the processes, and the norm penalty (a mean over
# positions, which the token-count normalisation would weight wrongly).

# %% tags=["remove-cell"]
#| test
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from looplm.checkpoints import read_checkpoint
from looplm.distributed import run_train
from looplm.train import main as train_main

SMALL = ["--task", "addition", "--difficulty", "3", "--batch-size", "12", "--d-model", "32", "--n-heads", "2",
         "--n-train", "500", "--n-test", "50", "--no-progress"]


def _single(flags, out):
    subprocess.run([sys.executable, "-m", "looplm.train", *flags, "--out", str(out)], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})


def _losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _close(a, b, tolerance=1e-5):
    return len(a) == len(b) and max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= tolerance


def test_a_run_resumes_with_another_number_of_processes(tmp_path):
    half = SMALL + ["--steps", "4", "--eval-every", "4"]
    rest = SMALL + ["--steps", "8", "--eval-every", "4", "--resume"]
    _single(half, tmp_path / "one")
    ways = {"ddp": ("ddp", 1, 2), "fsdp": ("fsdp", 1, 2), "two machines": ("ddp", 2, 1)}
    for way in ways:
        shutil.copytree(tmp_path / "one", tmp_path / way)
    _single(rest, tmp_path / "one")                           # the one-process run, resumed
    for way, (kind, nnodes, nproc) in ways.items():           # the same, resumed by two processes
        launched = run_train(rest + ["--parallel", kind, "--out", tmp_path / way], nproc=nproc, nnodes=nnodes)
        assert _close(_losses(tmp_path / way), _losses(tmp_path / "one")), way
        if nnodes == 2:                                       # two agents met at one rendezvous
            assert launched.log.count("step      8/8") == 1
    experts = SMALL + ["--mlp", "moe", "--n-experts", "4", "--eval-every", "3"]
    _single(experts + ["--steps", "3"], tmp_path / "moe-one")
    run_train(experts + ["--steps", "3", "--parallel", "fsdp", "--expert-parallel", "--out", tmp_path / "moe"])
    one, two = (read_checkpoint(tmp_path / d / "checkpoint.pt")["trainer"] for d in ("moe-one", "moe"))
    assert one["model"].keys() == two["model"].keys()        # every rank's experts, gathered
    for name, tensor in one["model"].items():
        assert torch.allclose(two["model"][name], tensor, rtol=1e-5, atol=1e-6), name
    for i, moments in one["optimizer"]["state"].items():
        for key, tensor in moments.items():
            assert torch.allclose(two["optimizer"]["state"][i][key], tensor, rtol=1e-4, atol=1e-9), (i, key)
    _single(experts + ["--steps", "6", "--resume"], tmp_path / "moe-one")
    run_train(experts + ["--steps", "6", "--resume", "--parallel", "ddp", "--expert-parallel", "--out",
                         tmp_path / "moe"])                 # the experts sliced again
    assert _close(_losses(tmp_path / "moe"), _losses(tmp_path / "moe-one"))


def _workers(marker):
    """{LOCAL_RANK: pid} of the processes whose environment holds LOOPLM_TEST_RUN=marker."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOOPLM_TEST_RUN={marker}".encode() in environ:
            ranks = [e for e in environ if e.startswith(b"LOCAL_RANK=")]
            if ranks:
                found[int(ranks[0].split(b"=")[1])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc (Linux)")
def test_a_killed_worker_stops_the_run_and_leaves_the_last_checkpoint_whole(tmp_path):
    out, marker, failure = tmp_path / "run", uuid.uuid4().hex, []

    def run():
        try:
            run_train(SMALL + ["--steps", "2000", "--eval-every", "3", "--parallel", "ddp", "--out", out],
                      timeout=120, env={"LOOPLM_TEST_RUN": marker})
        except RuntimeError as e:
            failure.append(str(e))

    thread = threading.Thread(target=run)
    start = time.perf_counter()
    thread.start()
    while not (out / "checkpoint.pt").exists() and time.perf_counter() - start < 90:
        time.sleep(0.05)
    assert (out / "checkpoint.pt").exists()
    workers = _workers(marker)
    os.kill(workers[1], signal.SIGKILL)
    thread.join(timeout=110)
    assert not thread.is_alive() and failure, "the launch must fail, not hang"
    assert "killed by SIGKILL" in failure[0]
    assert time.perf_counter() - start < 120
    time.sleep(0.5)
    assert not _workers(marker), "no worker may outlive the launch"
    payload = read_checkpoint(out / "checkpoint.pt")                   # complete and readable
    step = payload["trainer"]["step"]
    assert step % 3 == 0 and step >= 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][:step] == list(range(1, step + 1))


def test_flags_that_cannot_work_stop_with_a_message(tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    base = SMALL + ["--steps", "2", "--out", str(tmp_path / "run")]

    def error(flags, **env):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            assert train_main(base + flags) == 2
        return capsys.readouterr().err

    assert "started by torchrun" in error(["--parallel", "ddp"])
    assert "add --mlp moe" in error(["--parallel", "ddp", "--expert-parallel"], RANK="0", WORLD_SIZE="2")
    assert "needs several processes" in error(["--mlp", "moe", "--expert-parallel"])
    assert "--parallel is none" in error([], RANK="0", WORLD_SIZE="2")
    batch = error(["--parallel", "ddp"], RANK="0", WORLD_SIZE="5")
    assert "--batch-size 12 is the global batch" in batch and "multiple of 5" in batch
    assert "multiple of 3" in error(["--parallel", "fsdp", "--mlp", "moe", "--n-experts", "4", "--expert-parallel"],
                                    RANK="0", WORLD_SIZE="3")
    assert "--norm-penalty" in error(["--parallel", "ddp", "--norm-penalty", "0.1"], RANK="0", WORLD_SIZE="2")
    assert not (tmp_path / "run").exists()                              # nothing was written
