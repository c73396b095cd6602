# Generated from book/11_many_processes.py, book/11a_appendix_processes.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['TASKS', 'task', 'free_port', 'Launch', 'launch', 'main', 'collectives', 'TokenObjective', 'global_batch', 'allreduce_gradients', 'BucketedAllReduce', 'fsdp_shard', 'data_parallel_equals_one_process', 'counting_collectives', 'fsdp_collectives', 'step_collectives', 'step_traffic', 'expert_parallel_traffic', 'EXPERT_WEIGHTS', 'AllToAll', 'ExpertParallelMoE', 'reduce_replicated_grads', 'gather_experts', 'full_expert_grads', 'shard_experts_state', 'expert_parallel_equals_local', 'SHARDED_FORMAT', 'INFO_NAME', 'METADATA_NAME', 'OPTIMIZER_KEY', 'read_info', 'save_sharded', 'load_sharded', 'to_single_process', 'from_single_process', 'checkpoint_round_trip', 'data_parallel_cases', 'ddp_reduced_values', 'run_in_file', 'fails_on_rank', 'sleeps', 'gather_routing', 'ExpertParallelLoopMoE', 'split_experts', 'DataParallel', 'run_train']
# fmt: on

import contextlib
import copy
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict,
                                                     set_state_dict)

from looplm import __version__
from looplm.backprop import LoopLoss
from looplm.checkpoints import CheckpointError, checkpoint_model, read_checkpoint, write_checkpoint
from looplm.model import IGNORE_INDEX, LoopLM, LoopLMConfig
from looplm.moe import LoopMoE, MoEFeedForward, RoutingRecord, expert_forward, route
from looplm.train import PARALLEL, OneProcess
from looplm.train import _param_groups                  # the Trainer's grouping of the parameters

# --- book/11_many_processes.py:81 (cell 5) ---
TASKS = {}          # name -> the function every rank runs; a worker looks its task up here


def task(fn):
    """Register fn as a task workers can run: `python -m looplm.distributed NAME ARGS_JSON OUT`."""
    TASKS[fn.__name__] = fn
    return fn


def free_port():
    """A TCP port nothing listens on now (for the rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    results: list       # what each rank's task returned, by rank
    log: str            # every rank's output, as torchrun prints it
    seconds: float


def launch(name, args=None, nproc=2, timeout=180):
    """Run task `name` on `nproc` local processes with torchrun (gloo, one thread each). -> Launch.
    Raises RuntimeError with the log if a worker fails or the launch outlives `timeout` seconds."""
    if name not in TASKS:
        raise ValueError(f"no task {name!r}; the tasks are {', '.join(sorted(TASKS))}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--max-restarts=0",
                   "-m", "looplm.distributed", name, json.dumps(args or {}), out]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        try:
            log, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            log = _stop(process)
            raise RuntimeError(f"{name} on {nproc} processes did not finish within {timeout} s; "
                               f"the end of its log:\n{log[-3000:]}") from None
        if process.returncode != 0:
            raise RuntimeError(f"{name} on {nproc} processes failed{_first_error(log)} (exit status "
                               f"{process.returncode}); the end of its log:\n{log[-3000:]}")
        with open(out) as f:
            results = json.load(f)
    return Launch(results, log, time.perf_counter() - start)


def _first_error(log):
    """': ErrorName: message' of the first exception a worker printed, or ''."""
    found = re.search(r"^\[rank\d+\]: (\w*(?:Error|Exception|Interrupt)\b.*)$", log, flags=re.M)
    return f": {found.group(1)}" if found else ""


def _stop(process, grace=15):
    """Stop a torchrun launch: SIGTERM first (torchrun then stops its workers, which run in sessions
    of their own), SIGKILL to whatever is left after `grace` seconds. -> the log so far"""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        log, _ = process.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.stdout.close()                             # a worker may still hold the pipe
        process.wait()
        log = ""
    return log


def main(argv):
    """A worker: join the process group torchrun describes, run the task, gather the results."""
    name, args, out = argv[0], json.loads(argv[1]), argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        result = TASKS[name](**args)
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, result)              # a collective of Python objects
        if dist.get_rank() == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()

# --- book/11_many_processes.py:193 (cell 7) ---
@task
def collectives():
    """The four collectives on x = 10 * rank + (0, 1, 2, 3). -> {name: what this rank holds after it}"""
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.arange(4.0) + 10 * rank
    shown = {"mine": x.tolist()}
    summed = x.clone()
    dist.all_reduce(summed)
    shown["all-reduce"] = summed.tolist()
    pieces = [torch.empty(4) for _ in range(world)]
    dist.all_gather(pieces, x)
    shown["all-gather"] = torch.cat(pieces).tolist()
    mine = torch.empty(4 // world)
    dist.reduce_scatter_tensor(mine, x)
    shown["reduce-scatter"] = mine.tolist()
    exchanged = torch.empty(4)
    dist.all_to_all_single(exchanged, x)
    shown["all-to-all"] = exchanged.tolist()
    return shown

# --- book/11_many_processes.py:240 (cell 10) ---
class TokenObjective(nn.Module):
    """model -> (sum over the batch's learned tokens of a per-token objective, their count).

    objective: "last" (the last step's cross-entropy), "every step" (the mean over steps) or
    "stage1" (Ouro's Stage I, Σ_t p_t L_t - β H(p), β = 0.1; needs an exit gate). forward options
    (checkpoint=True, ...) go to the model."""

    def __init__(self, model, objective="last", **forward):
        super().__init__()
        if objective not in ("last", "every step", "stage1"):
            raise ValueError(f"objective must be 'last', 'every step' or 'stage1', got {objective!r}")
        self.model, self.objective, self.forward_options = model, objective, forward

    def forward(self, idx, targets):
        out = self.model(idx, targets, **self.forward_options)
        learned = targets != IGNORE_INDEX
        if self.objective == "last":
            per_token = out.step_losses[-1]
        elif self.objective == "every step":
            per_token = out.step_losses.mean(0)
        else:
            p = out.exit_probs
            entropy = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(0)
            per_token = (p * out.step_losses).sum(0) - 0.1 * entropy
        return (per_token * learned).sum(), learned.sum()


def global_batch(seed, batch_size, seq_len, vocab_size):
    """A reproducible batch of random tokens whose first 1 .. seq_len/2 - 1 targets (a prompt of
    its own length per example) are IGNORE_INDEX. -> idx, targets [batch_size, seq_len]"""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g)
    targets = idx[:, 1:].clone()
    prompt = torch.randint(1, max(2, seq_len // 2), (batch_size,), generator=g)
    targets[torch.arange(seq_len)[None] < prompt[:, None]] = IGNORE_INDEX
    return idx[:, :-1], targets

# --- book/11_many_processes.py:299 (cell 12) ---
def allreduce_gradients(model):
    """Sum every parameter's gradient over the ranks: one all-reduce per parameter."""
    for p in dict.fromkeys(model.parameters()):       # a tied weight once
        if p.grad is not None:
            dist.all_reduce(p.grad)


class BucketedAllReduce:
    """Gradients summed over the ranks in buckets of about `bucket_mb`, each bucket launched
    (asynchronously) as soon as the last of its gradients is final. Call finish() after backward:
    it waits for the buckets and writes the sums back. `reductions` counts parameters reduced."""

    def __init__(self, model, bucket_mb=25.0):
        self.params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
        limit, self.buckets, current, size = bucket_mb * 2**20, [], [], 0
        for p in reversed(self.params):               # backward reaches the last layers first
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= limit:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
        self.bucket_of = {p: i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.ready, self.pending, self.reductions = [0] * len(self.buckets), [], 0
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._ready)

    def _ready(self, p):
        i = self.bucket_of[p]
        self.ready[i] += 1
        if self.ready[i] == len(self.buckets[i]):     # the bucket's last gradient is final: send it
            flat = torch.cat([q.grad.reshape(-1) for q in self.buckets[i]])
            self.pending.append((i, flat, dist.all_reduce(flat, async_op=True)))
            self.reductions += len(self.buckets[i])

    def finish(self):
        for i, flat, handle in self.pending:
            handle.wait()
            offset = 0
            for q in self.buckets[i]:
                q.grad.copy_(flat[offset:offset + q.numel()].view_as(q.grad))
                offset += q.numel()
        self.pending, self.ready = [], [0] * len(self.buckets)

# --- book/11_many_processes.py:370 (cell 14) ---
def _build(config, seed, dtype):
    torch.manual_seed(seed)
    return LoopLM(LoopLMConfig(**config)).to(dtype)


def fsdp_shard(model, world, reshard=True):
    """FSDP2 on a LoopLM: every block its own fully_shard unit (reshard_after_forward=reshard; None:
    no block units, the blocks go with the root), then the root. -> model"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    if reshard is not None:
        for block in (*model.prelude, *model.core, *model.coda):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh)
    return model


def _wrap(way, objective, world, reshard=True):
    """The objective made data parallel in one of the ways this chapter builds."""
    if way in ("ddp", "ddp, model wrapped", "ddp, accumulating"):
        # static_graph and no_sync do not mix (an internal assertion in the reducer): accumulation
        # uses DDP's default, which the loop allows with non-reentrant checkpointing
        return nn.parallel.DistributedDataParallel(objective.model if way == "ddp, model wrapped" else objective,
                                                   static_graph=way != "ddp, accumulating")
    if way == "fsdp":
        fsdp_shard(objective.model, world, reshard)
    return objective


def _full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


@task
def data_parallel_equals_one_process(config, ways, steps=5, batch_size=8, seq_len=12, objective="last",
                                     forward=None, seed=0, dtype="float64"):
    """Train one model several ways on `steps` global batches and, on every rank, the same model in
    one process on the whole batch. -> {way: {"loss": largest |loss - one process's|,
    "parameters": largest |parameter - one process's|}} (losses: the global batch's, all-reduced)."""
    dtype, forward = getattr(torch, dtype), forward or {}
    rank, world = dist.get_rank(), dist.get_world_size()
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the world size {world}")
    per_rank, vocab = batch_size // world, config["vocab_size"]
    reference = TokenObjective(_build(config, seed, dtype), objective, **forward)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    reference_losses = []
    for step in range(steps):
        total, count = reference(*global_batch(seed + step, batch_size, seq_len, vocab))
        loss = total / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reference_losses.append(loss.item())
    report = {}
    for way in ways:
        model = TokenObjective(_build(config, seed, dtype), objective, **forward)
        wrapped = _wrap(way, model, world)
        reducer = BucketedAllReduce(model, bucket_mb=0.01) if way == "bucketed" else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scale = world if way.startswith(("ddp", "fsdp")) else 1       # these average over the ranks
        losses = []
        for step in range(steps):
            idx, targets = global_batch(seed + step, batch_size, seq_len, vocab)
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            count = (targets[mine] != IGNORE_INDEX).sum()
            dist.all_reduce(count)                                      # learned tokens on all ranks
            if way == "ddp, model wrapped":                             # forward returns a LoopOutput
                out = wrapped(idx[mine], targets[mine], **forward)
                total = (out.step_losses[-1] * (targets[mine] != IGNORE_INDEX)).sum()
                (total / count * scale).backward()
            elif way == "ddp, accumulating":                            # two micro-batches per rank
                half = per_rank // 2
                total = 0.0
                for j, part in enumerate((slice(0, half), slice(half, per_rank))):
                    rows = slice(mine.start + part.start, mine.start + part.stop)
                    context = wrapped.no_sync() if j == 0 else contextlib.nullcontext()
                    with context:
                        part_total, _ = wrapped(idx[rows], targets[rows])
                        (part_total / count * scale).backward()
                    total = total + part_total.detach()
            else:
                total, _ = wrapped(idx[mine], targets[mine])
                (total / count * scale).backward()
            if way == "by hand":
                allreduce_gradients(model)
            elif reducer is not None:
                reducer.finish()
            optimizer.step()
            optimizer.zero_grad()
            global_loss = (total / count).detach().clone()
            dist.all_reduce(global_loss)
            losses.append(global_loss.item())
        report[way] = {"loss": max(abs(a - b) for a, b in zip(losses, reference_losses)),
                       "parameters": max((_full(p) - q.detach()).abs().max().item()
                                         for p, q in zip(model.parameters(), reference.parameters()))}
        if reducer is not None:
            report[way]["reductions per parameter per step"] = reducer.reductions / steps / len(reducer.params)
    return report

# --- book/11_many_processes.py:515 (cell 18) ---
# the functions a collective can go through; FSDP2 calls the *_single names where torch has them
_COUNTED = (("all-gather", "all_gather_into_tensor"), ("all-gather", "all_gather_single"),
            ("reduce-scatter", "reduce_scatter_tensor"), ("reduce-scatter", "reduce_scatter_single"),
            ("all-reduce", "all_reduce"))


@contextlib.contextmanager
def counting_collectives():
    """Count the all-gathers, reduce-scatters and all-reduces this process issues, and the bytes it
    puts in: the input of an all-gather, reduce-scatter or all-reduce. -> {kind: [calls, bytes]}"""
    counts = {kind: [0, 0] for kind, _ in _COUNTED}
    originals = {name: getattr(dist, name) for _, name in _COUNTED if hasattr(dist, name)}

    def counted(kind, original):
        def call(*args, **kwargs):
            if original is originals.get("all_reduce"):
                sent = args[0] if args else kwargs["tensor"]
            else:
                sent = args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_tensor"))
            counts[kind][0] += 1
            counts[kind][1] += sent.numel() * sent.element_size()
            return original(*args, **kwargs)
        return call

    for kind, name in _COUNTED:
        if name in originals:
            setattr(dist, name, counted(kind, originals[name]))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


@task
def fsdp_collectives(config, loops=(1, 2, 4), seed=0):
    """For each S in `loops` and each way to shard the core: the collectives one training step of
    FSDP2 issues. reshard True / False: the core block is its own fully_shard unit with that
    reshard_after_forward; None: only the root is sharded, the core with it. -> [{S, reshard, counts}]"""
    if config.get("n_prelude", 0) or config.get("n_coda", 0):
        raise ValueError("fsdp_collectives counts the core's collectives: use a config without prelude or coda")
    rows = []
    for reshard in (True, False, None):                   # None: the core is part of the root's unit
        for n_loops in loops:
            model = fsdp_shard(_build({**config, "n_loops": n_loops}, seed, torch.float32), dist.get_world_size(),
                               reshard)
            objective = TokenObjective(model)
            idx, targets = global_batch(seed, 2, 8, config["vocab_size"])
            with counting_collectives() as counts:
                total, count = objective(idx, targets)
                (total / count).backward()
            rows.append({"S": n_loops, "reshard": reshard, "counts": counts,
                         "core parameters": sum(p.numel() for p in model.core.parameters()),
                         "all parameters": sum(p.numel() for p in model.parameters())})
    return rows

# --- book/11_many_processes.py:613 (cell 21) ---
def step_collectives(parameters, core_parameters, loops, way):
    """The collectives one training step issues, by this chapter's model: [(kind, values of the
    full tensor)]. way: "ddp", "fsdp resharded" (core its own unit), "fsdp kept" (its own unit,
    reshard_after_forward=False) or "fsdp root" (the core inside the root's unit)."""
    P, Pc, S = parameters, core_parameters, loops
    if way == "ddp":
        return [("all-reduce", P)]
    gathers = {"fsdp resharded": [P - Pc] + [Pc] * (2 * S), "fsdp kept": [P - Pc] + [Pc] * S,
               "fsdp root": [P]}.get(way)
    if gathers is None:
        raise ValueError(f"way must be 'ddp', 'fsdp resharded', 'fsdp kept' or 'fsdp root', got {way!r}")
    scatters = [P] if way == "fsdp root" else [P - Pc, Pc]
    return [("all-gather", v) for v in gathers] + [("reduce-scatter", v) for v in scatters]


def step_traffic(parameters, core_parameters, world, loops, way, bytes_per_value=4):
    """Bytes each rank sends per training step over ring collectives: (W-1)/W of the full tensor for
    an all-gather or a reduce-scatter, twice that for an all-reduce."""
    ring = (world - 1) / world
    return sum(ring * values * bytes_per_value * (2 if kind == "all-reduce" else 1)
               for kind, values in step_collectives(parameters, core_parameters, loops, way))


def expert_parallel_traffic(tokens, top_k, width, world, loops, moe_blocks=1, bytes_per_value=4):
    """Bytes each rank sends per training step for expert parallelism: for every MoE block at each
    of the S steps, a dispatch and a combine all-to-all in the forward and again in the backward,
    each sending the (W-1)/W of a rank's k * tokens * width values that go to other ranks' experts."""
    return 4 * loops * moe_blocks * (world - 1) / world * top_k * tokens * width * bytes_per_value

# --- book/11_many_processes.py:727 (cell 27) ---
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


class AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single along dim 0.

    forward(x, output_splits, input_splits, group, log, name): sends x's rows in blocks of
    input_splits[i] to rank i and returns the concatenation of the blocks received, of sizes
    output_splits. backward sends the gradient back with the splits swapped. `log` (a Counter or
    None) is incremented under `name` and `name + "_backward"`, one per collective call.
    """

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, log, name):
        ctx.output_splits, ctx.input_splits = output_splits, input_splits
        ctx.group, ctx.log, ctx.name = group, log, name
        x = x.contiguous()
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
        if log is not None:
            log[name] += 1
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty((sum(ctx.input_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad, ctx.input_splits, ctx.output_splits, group=ctx.group)
        if ctx.log is not None:
            ctx.log[ctx.name + "_backward"] += 1
        return out, None, None, None, None, None


def _rank_and_world(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ExpertParallelMoE needs an initialised torch.distributed process group")
    return dist.get_rank(group), dist.get_world_size(group)


def _owned(n_experts, rank, world):
    if n_experts % world:
        raise ValueError(f"n_experts={n_experts} must be divisible by the world size {world}")
    n_local = n_experts // world
    return rank * n_local, n_local


class ExpertParallelMoE(nn.Module):
    """MoEFeedForward with its experts split over the ranks of `group` (default: the world).

    Built on every rank from the same full MoEFeedForward `moe` (same weights everywhere); keeps
    copies of this rank's experts, shapes w_gate, w_up [E_local, d_model, d_expert] and
    w_down [E_local, d_expert, d_model], and replicated copies of the router, the choice bias and
    the shared experts. forward(x [..., d_model]) -> [..., d_model] on this rank's tokens; it
    records its routing in last_routing (a RoutingRecord for the local tokens).

    calls: the number of all_to_all_single calls made by this module (forward and backward);
    calls_by_kind: a Counter with keys "counts", "dispatch", "combine", "dispatch_backward",
    "combine_backward". One forward makes one of each of the first three, one backward one of
    each of the last two.
    """

    def __init__(self, moe: MoEFeedForward, group=None):
        super().__init__()
        if not isinstance(moe, MoEFeedForward):
            raise TypeError(f"expected a MoEFeedForward, got {type(moe).__name__}")
        if moe.capacity_factor is not None:
            raise NotImplementedError(
                f"capacity_factor={moe.capacity_factor}: ExpertParallelMoE is dropless only; "
                "build the layer with capacity_factor=None")
        self.group = group
        self.rank, self.world = _rank_and_world(group)
        self.first_expert, self.n_local = _owned(moe.n_experts, self.rank, self.world)
        self.d_model, self.n_experts, self.top_k, self.d_expert = moe.d_model, moe.n_experts, moe.top_k, moe.d_expert
        self.router_kind, self.impl = moe.router_kind, moe.impl
        self.router = copy.deepcopy(moe.router)
        self.shared = copy.deepcopy(moe.shared) if moe.shared is not None else None
        self.register_buffer("bias", moe.bias.detach().clone())
        owned = slice(self.first_expert, self.first_expert + self.n_local)
        for name in EXPERT_WEIGHTS:
            setattr(self, name, nn.Parameter(getattr(moe, name).detach()[owned].clone()))
        self.last_routing = None
        self.calls_by_kind = Counter()

    @property
    def calls(self):
        return sum(self.calls_by_kind.values())

    def reset_calls(self):
        self.calls_by_kind.clear()

    def replicated_parameters(self):
        """The parameters every rank holds a full copy of (router, shared experts)."""
        params = list(self.router.parameters())
        if self.shared is not None:
            params += list(self.shared.parameters())
        return params

    def _run_owned(self, rows, counts):
        """rows [n, d] sorted by owned expert, counts [E_local] (python ints) -> outputs [n, d]."""
        if self.impl == "loop":
            outs, start = [], 0
            for e, c in enumerate(counts):            # every expert, empty ones too, keeps the graph whole
                outs.append(expert_forward(rows[start:start + c], self.w_gate[e], self.w_up[e], self.w_down[e]))
                start += c
            return torch.cat(outs)
        n, d = rows.shape
        m = max(counts)
        counts_t = torch.tensor(counts, device=rows.device)
        expert = torch.repeat_interleave(torch.arange(self.n_local, device=rows.device), counts_t)
        place = torch.arange(n, device=rows.device) - (counts_t.cumsum(0) - counts_t)[expert]
        row = expert * m + place                      # position in the padded (E_local * m, d)
        padded = rows.new_zeros(self.n_local * m, d).index_copy(0, row, rows).view(self.n_local, m, d)
        hidden = F.silu(torch.bmm(padded, self.w_gate)) * torch.bmm(padded, self.w_up)
        return torch.bmm(hidden, self.w_down).reshape(self.n_local * m, d)[row]

    def forward(self, x):
        flat = x.reshape(-1, self.d_model)
        k, W, El = self.top_k, self.world, self.n_local
        record = route(flat, self.router.weight, self.bias, k, self.router_kind, None)
        self.last_routing = record

        # Local assignments sorted by expert id: contiguous per destination rank, since rank r
        # owns experts [r * El, (r + 1) * El).
        expert = record.chosen.reshape(-1)                                   # (N * k,) token-major
        order = torch.argsort(expert, stable=True)
        token = order // k
        gates = record.gates.reshape(-1)[order].to(x.dtype)
        send_counts = torch.bincount(expert, minlength=self.n_experts)       # (E,)

        # Counts exchange: block i of send_counts (experts owned by rank i) goes to rank i;
        # recv_counts[i, j] = rows rank i will send to this rank's j-th expert.
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        self.calls_by_kind["counts"] += 1
        recv_counts = recv_counts.view(W, El)
        input_splits = send_counts.view(W, El).sum(1).tolist()
        output_splits = recv_counts.sum(1).tolist()

        # Dispatch: received rows are ordered by source rank, then expert, then source order.
        received = AllToAll.apply(flat[token], output_splits, input_splits, self.group, self.calls_by_kind,
                                  "dispatch")

        # Group by owned expert (stable: source rank, then source order, within an expert).
        local_expert = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(W), recv_counts.reshape(-1))
        by_expert = torch.argsort(local_expert, stable=True)
        out = self._run_owned(received[by_expert], recv_counts.sum(0).tolist())
        out = torch.empty_like(out).index_copy(0, by_expert, out)            # back to the received order

        # Combine: each row returns to its source rank, in the order it was sent.
        back = AllToAll.apply(out, input_splits, output_splits, self.group, self.calls_by_kind, "combine")
        y = torch.zeros_like(flat).index_add(0, token, back * gates[:, None])
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(x.shape)

    def extra_repr(self):
        return (f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}, d_expert={self.d_expert}, "
                f"router={self.router_kind!r}, impl={self.impl!r}, rank={self.rank}, world={self.world}, "
                f"experts=[{self.first_expert}, {self.first_expert + self.n_local})")


@torch.no_grad()
def reduce_replicated_grads(module, average=False):
    """All-reduce (sum; mean if average) the gradients of every ExpertParallelMoE's replicated
    parameters (router, shared experts) in `module` across that layer's group. Parameters with no
    gradient on this rank take part with zeros, so every rank makes the same calls. Expert weights
    are left alone: their gradients are complete on their owners."""
    layers = [m for m in module.modules() if isinstance(m, ExpertParallelMoE)]
    for layer in layers:
        for p in layer.replicated_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=layer.group)
            if average:
                p.grad /= layer.world


def _gather_experts_of(tensors, layer):
    out = {}
    for name, t in tensors.items():
        parts = [torch.empty_like(t) for _ in range(layer.world)]
        dist.all_gather(parts, t.contiguous(), group=layer.group)
        out[name] = torch.cat(parts)
    return out


@torch.no_grad()
def gather_experts(module):
    """{name: [E, ...]}: the full w_gate, w_up, w_down, all-gathered over the group (every rank
    gets them)."""
    return _gather_experts_of({n: getattr(module, n).detach() for n in EXPERT_WEIGHTS}, module)


@torch.no_grad()
def full_expert_grads(module):
    """{name: [E, ...]}: the gradients of w_gate, w_up, w_down, all-gathered over the group
    (zeros where a rank has no gradient)."""
    grads = {}
    for n in EXPERT_WEIGHTS:
        p = getattr(module, n)
        grads[n] = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
    return _gather_experts_of(grads, module)


def shard_experts_state(moe_state_dict, rank, world):
    """A MoEFeedForward state_dict -> the state_dict of the ExpertParallelMoE on `rank` of
    `world` ranks: expert weights sliced to that rank's experts, everything else unchanged."""
    n_experts = moe_state_dict["w_gate"].shape[0]
    first, n_local = _owned(n_experts, rank, world)
    return {name: (t[first:first + n_local].clone() if name in EXPERT_WEIGHTS else t.clone())
            for name, t in moe_state_dict.items()}

# --- book/11_many_processes.py:954 (cell 29) ---
@task
def expert_parallel_equals_local(cases, loops=3, seed=0):
    """For each case (MoEFeedForward options), expert parallelism on 2+ ranks against the local layer in
    one process on all ranks' tokens, float64. -> [{case, output, input grad, expert grads, router grad,
    calls}] with the largest absolute differences and the all-to-all calls of a layer applied `loops` times."""
    rank, world = dist.get_rank(), dist.get_world_size()
    report = []
    for case in cases:
        torch.manual_seed(seed)
        local = MoEFeedForward(8, 4, case.get("top_k", 2), 6, router=case.get("router", "softmax"),
                               n_shared=case.get("n_shared", 0)).double()
        with torch.no_grad():
            for p in local.parameters():
                p.normal_(0, 0.5)
        layer = ExpertParallelMoE(local)
        g = torch.Generator().manual_seed(seed + 1)
        sizes = [5 + 3 * r for r in range(world)]                       # ranks hold different numbers
        tokens = [torch.randn(n, 8, generator=g, dtype=torch.float64) for n in sizes]
        weights = [torch.randn(n, 8, generator=g, dtype=torch.float64) for n in sizes]
        everything = torch.cat(tokens).requires_grad_()
        (local(everything) * torch.cat(weights)).sum().backward()
        x = tokens[rank].clone().requires_grad_()
        layer.reset_calls()
        y = layer(x)
        (y * weights[rank]).sum().backward()
        reduce_replicated_grads(layer)
        start = sum(sizes[:rank])
        expert_grads = full_expert_grads(layer)
        with torch.no_grad():
            same_tokens = local(tokens[rank])
        row = {"case": case, "output": (y - same_tokens).abs().max().item(),
               "input grad": (x.grad - everything.grad[start:start + sizes[rank]]).abs().max().item(),
               "expert grads": max((expert_grads[n] - getattr(local, n).grad).abs().max().item()
                                   for n in EXPERT_WEIGHTS),
               "router grad": (layer.router.weight.grad - local.router.weight.grad).abs().max().item(),
               "calls, one call": dict(layer.calls_by_kind)}
        layer.reset_calls()
        h = tokens[rank].clone().requires_grad_()
        for _ in range(loops):                                          # as the looped core calls it
            h = h + layer(h)
        h.sum().backward()
        row["calls, looped"] = dict(layer.calls_by_kind)
        report.append(row)
    return report

# --- book/11_many_processes.py:1033 (cell 32) ---
_UNUSED_ALL = ["SHARDED_FORMAT", "INFO_NAME", "save_sharded", "load_sharded", "read_info",
           "to_single_process", "from_single_process"]

SHARDED_FORMAT = "looplm-sharded-checkpoint"
INFO_NAME = "looplm.json"          # written last, by rank 0: its presence marks a finished save
METADATA_NAME = ".metadata"        # DCP's index, written by its coordinator (rank 0)
EMBED, HEAD = "embed.weight", "lm_head.weight"
OPTIMIZER_KEY = "optimizer_fqn"    # where a single-process file keeps the name-keyed optimizer state


# ----------------------------------------------------------------------------------------------
# The model behind the wrappers, and its tied matrix

def _base_model(model):
    """The LoopLM inside `model` (FSDP2 keeps the class, DDP wraps it in .module, torch.compile
    in ._orig_mod). TypeError if there is none."""
    seen = model
    for _ in range(4):
        if isinstance(seen, LoopLM):
            return seen
        inner = getattr(seen, "module", None)
        seen = getattr(seen, "_orig_mod", None) if inner is None else inner
        if seen is None:
            break
    raise TypeError(f"model must be a LoopLM (sharded with fully_shard, or wrapped in DDP), "
                    f"got {type(model).__name__}")


def _is_tied(base):
    """True when the LM head uses the embedding matrix itself. ValueError if the config asks for
    the tie but the model has lost it (lm_head.weight was replaced by another tensor)."""
    tied = base.lm_head.weight is base.embed.weight
    if base.config.tie_embeddings and not tied:
        raise ValueError("the model's config has tie_embeddings=True but model.lm_head.weight is not "
                         "model.embed.weight: the tie was broken after the model was built")
    return tied


def _untie(state, tied):
    """The model state dict with the tied matrix under one name only (embed.weight)."""
    state = dict(state)
    if tied:
        state.pop(HEAD, None)
    return state


def _retie(state, tied):
    """The model state dict with the tied matrix under both of its names again."""
    state = dict(state)
    if tied:
        state[HEAD] = state[EMBED]
    return state


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def _single_process_quietly(single):
    """DCP warns that it is 'assuming the intent' to work in one process when no process group is
    initialized; here that is the intent, so the warning is dropped (only then, only that one)."""
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore",
                                    message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")
        yield


def _save(state, directory, group=None, single=False):
    with _single_process_quietly(single):
        dcp.save(state, storage_writer=FileSystemWriter(directory), process_group=group, no_dist=single)


def _load(state, directory, group=None, single=False):
    with _single_process_quietly(single):
        dcp.load(state, storage_reader=FileSystemReader(directory), process_group=group, no_dist=single)


# ----------------------------------------------------------------------------------------------
# Rank 0 does the file-system bookkeeping; every rank learns how it went

class _Group:
    """The ranks taking part: a process group, or this process alone (no process group)."""

    def __init__(self, process_group=None):
        self.distributed = dist.is_available() and dist.is_initialized()
        if process_group is not None and not self.distributed:
            raise RuntimeError("process_group was given, but torch.distributed is not initialized")
        self.group = process_group
        self.rank = dist.get_rank(process_group) if self.distributed else 0
        self.size = dist.get_world_size(process_group) if self.distributed else 1
        self.leader = dist.get_global_rank(process_group, 0) if self.distributed and process_group else 0

    def barrier(self):
        if self.distributed:
            dist.barrier(group=self.group)

    def on_leader(self, fn):
        """fn() on rank 0; its result on every rank. If it raises, every rank raises: rank 0 its
        own exception, the others an exception of the same kind (for the built-in kinds used here)
        with the same message. Doubles as a barrier."""
        outcome, error = None, None
        if self.rank == 0:
            try:
                outcome = ("ok", fn())
            except Exception as e:                            # noqa: BLE001  (re-raised below)
                error = e
                outcome = ("error", (type(e).__name__, str(e)))
        if self.distributed:
            box = [outcome]
            dist.broadcast_object_list(box, src=self.leader, group=self.group)
            outcome = box[0]
        if error is not None:
            raise error
        kind, value = outcome
        if kind == "ok":
            return value
        name, message = value
        cls = _SHARED_ERRORS.get(name, RuntimeError)
        raise cls(f"on rank 0: {message}" if cls is RuntimeError else message)


_SHARED_ERRORS = {cls.__name__: cls for cls in (CheckpointError, ValueError, TypeError, FileExistsError,
                                                FileNotFoundError, NotADirectoryError, PermissionError,
                                                OSError)}


# ----------------------------------------------------------------------------------------------
# Directories: temporary names, the info file, publishing

def _temporary_pattern(directory):
    return re.compile(re.escape(f".{directory.name}.") + r"[0-9a-f]+\.tmp")


def _stale_temporaries(directory):
    """The hidden directories that interrupted saves of `directory` left next to it."""
    pattern = _temporary_pattern(directory)
    try:
        names = sorted(os.listdir(directory.parent))
    except OSError:
        return []
    return [directory.parent / name for name in names if pattern.fullmatch(name)]


def _fsync_directory(path):
    """Flush a directory's entries (new files, renames) to disk, where the OS allows it."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _prepare(directory, overwrite):
    """Rank 0, before a save: refuse or plan to replace an existing `directory`, delete the
    leftovers of interrupted saves of it, and create a fresh temporary directory. -> its path."""
    if directory.exists() and not overwrite:
        raise FileExistsError(f"a checkpoint already exists at {directory}; pass overwrite=True to replace it")
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory; a sharded checkpoint is a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temporaries(directory):
        shutil.rmtree(stale, ignore_errors=True)
    while True:
        temporary = directory.parent / f".{directory.name}.{os.urandom(6).hex()}.tmp"
        try:
            temporary.mkdir()
            return str(temporary)
        except FileExistsError:                               # 2**48 names: try another
            continue


def _write_info(temporary, info):
    """looplm.json in `temporary`, flushed to disk before the directory is renamed."""
    path = Path(temporary) / INFO_NAME
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_directory(temporary)


def _publish(temporary, directory, overwrite):
    """Rename the finished `temporary` to `directory` (the commit point of a save).

    An existing `directory` (overwrite=True) is first renamed aside to .NAME.<hex>.old and deleted
    once the new one is in place; between the two renames the old checkpoint is still complete,
    under that hidden name."""
    temporary, directory = Path(temporary), Path(directory)
    old = None
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"a checkpoint appeared at {directory} during the save; "
                                  f"the new one is left at {temporary}")
        old = directory.parent / f".{directory.name}.{os.urandom(6).hex()}.old"
        os.rename(directory, old)
    os.rename(temporary, directory)
    _fsync_directory(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _finish(temporary, directory, info, overwrite):
    """Rank 0, once every rank has written its shards: the info file, then the rename."""
    _write_info(temporary, info)
    _publish(temporary, directory, overwrite)
    return str(directory)


def _info(base, optimizer, step, world_size, tied, dtype):
    return {
        "format": SHARDED_FORMAT,
        "looplm_version": __version__,
        "torch_version": torch.__version__,
        "step": step,
        "model_config": dataclasses.asdict(base.config),
        "dtype": _dtype_name(dtype),
        "tied_embeddings": tied,
        "optimizer": None if optimizer is None else type(optimizer).__name__,
        "world_size": world_size,
    }


def _version_tuple(version):
    return tuple(int(part) for part in re.findall(r"\d+", str(version))[:3])


def read_info(directory):
    """The contents of looplm.json of the sharded checkpoint `directory`, after checking that the
    directory is a finished checkpoint this looplm can read.

    FileNotFoundError if there is no such directory (the message says when an interrupted save
    left a hidden temporary directory instead); CheckpointError (a ValueError) if it is not a
    complete sharded checkpoint, was written by a newer looplm, or its info file is damaged.
    """
    directory = Path(directory)
    if not directory.exists():
        stale = _stale_temporaries(directory)
        hint = (f"; an interrupted save left {stale[0].name} next to where it would be, which is not "
                f"a usable checkpoint (the next save of {directory.name} deletes it)") if stale else ""
        raise FileNotFoundError(f"no sharded checkpoint at {directory}{hint}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file, not a sharded checkpoint directory "
                              f"(for a single-process checkpoint file use from_single_process or "
                              f"looplm.checkpoints.load_model)")
    missing = [name for name in (METADATA_NAME, INFO_NAME) if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory} is not a complete sharded looplm checkpoint: it has no "
                              f"{' and no '.join(missing)}")
    try:
        info = json.loads((directory / INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory / INFO_NAME} cannot be read: {e}") from e
    if not isinstance(info, dict) or info.get("format") != SHARDED_FORMAT:
        raise CheckpointError(f"{directory} is not a sharded looplm checkpoint "
                              f"({INFO_NAME} has no format={SHARDED_FORMAT!r} entry)")
    written_by = info.get("looplm_version")
    if len(_version_tuple(written_by)) != 3:
        raise CheckpointError(f"{directory} was written by an unknown looplm version {written_by!r}")
    if _version_tuple(written_by) > _version_tuple(__version__):
        raise CheckpointError(f"{directory} was written by looplm {written_by}, newer than the installed "
                              f"looplm {__version__}; upgrade looplm to load it")
    for key, kind in (("step", int), ("model_config", dict), ("tied_embeddings", bool)):
        if not isinstance(info.get(key), kind) or (kind is int and isinstance(info[key], bool)):
            raise CheckpointError(f"{directory / INFO_NAME} has no valid {key!r} entry")
    return info


def _stored_config(directory, info):
    try:
        return LoopLMConfig(**info["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory} holds a model config this looplm cannot build: {e}") from e


def _check_config(directory, info, base):
    """CheckpointError unless the checkpoint was saved from a model with base's config."""
    stored = _stored_config(directory, info)
    if stored != base.config:
        a, b = dataclasses.asdict(stored), dataclasses.asdict(base.config)
        differences = [f"{k}: checkpoint {a[k]!r}, model {b[k]!r}" for k in a if a[k] != b[k]]
        raise CheckpointError(f"{directory} holds a model with another config than the model given: "
                              + "; ".join(differences))


def _check_tensors(directory, metadata, state, prefix="model."):
    """CheckpointError unless every tensor of `state` is in the checkpoint with its shape and dtype
    (checked on every rank before DCP's collective load, so that all ranks stop with this message)."""
    stored = metadata.state_dict_metadata
    problems = []
    for name, tensor in state.items():
        key = prefix + name
        entry = stored.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            problems.append(f"{key} is missing")
        elif tuple(entry.size) != tuple(tensor.shape):
            problems.append(f"{key} is {list(entry.size)} in the checkpoint and {list(tensor.shape)} in the model")
        elif entry.properties.dtype != tensor.dtype:
            problems.append(f"{key} is {_dtype_name(entry.properties.dtype)} in the checkpoint and "
                            f"{_dtype_name(tensor.dtype)} in the model")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointError(f"{directory} does not fit the model: {shown}")


def _check_optimizer(directory, info, metadata, optimizer):
    """CheckpointError unless the checkpoint holds the state of an optimizer of this kind with as
    many parameter groups (set_state_dict matches the groups' parameters by name, but would
    quietly merge groups into fewer, each taking one group's hyperparameters)."""
    if info.get("optimizer") is None:
        raise CheckpointError(f"{directory} holds no optimizer state (it was saved from the weights alone, "
                              f"or before the optimizer's first step); pass optimizer=None to load the weights")
    if info["optimizer"] != type(optimizer).__name__:
        raise CheckpointError(f"{directory} holds the state of a {info['optimizer']} optimizer, "
                              f"not of a {type(optimizer).__name__}")
    groups = {key.split(".")[2] for key in metadata.state_dict_metadata if key.startswith("optimizer.param_groups.")}
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{directory} holds an optimizer with {len(groups)} parameter group(s), but the "
                              f"optimizer given has {len(optimizer.param_groups)}; build it with the same groups")


def _require_step(step):
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return step


def _model_dtype(base):
    return base.embed.weight.dtype

# --- book/11_many_processes.py:1389 (cell 34) ---
# ----------------------------------------------------------------------------------------------
# Save and load on any number of ranks

def save_sharded(model, optimizer, directory, step, *, overwrite=False, process_group=None):
    """Save `model` (a LoopLM sharded with fully_shard, wrapped in DDP, or plain) and `optimizer`
    (or None: the weights only) to the directory `directory`, atomically. -> the directory (a Path).

    Every rank of the process group must call it, with the same directory, which they must all
    see (a shared file system). Each rank writes its own shards; rank 0 also writes DCP's index
    and looplm.json (step, model config). Without a process group it saves from this process.
    An optimizer that has not taken a step has no state yet: then the weights alone are saved
    (get_state_dict would otherwise create the state with a zero step, changing the optimizer).
    FileExistsError if `directory` exists and overwrite is False.
    """
    step = _require_step(step)
    base = _base_model(model)
    tied = _is_tied(base)
    directory = Path(directory)
    group = _Group(process_group)
    if optimizer is not None and not optimizer.state:
        optimizer = None
    temporary = group.on_leader(lambda: _prepare(directory, overwrite))
    model_state, optimizer_state = get_state_dict(model, [] if optimizer is None else optimizer)
    state = {"model": _untie(model_state, tied)}
    if optimizer is not None:
        state["optimizer"] = optimizer_state
    _save(state, temporary, process_group, single=not group.distributed)
    group.barrier()                                           # every rank's shards are on disk
    info = _info(base, optimizer, step, group.size, tied, _model_dtype(base))
    return Path(group.on_leader(lambda: _finish(temporary, directory, info, overwrite)))


def load_sharded(model, optimizer, directory, *, process_group=None):
    """Load the sharded checkpoint `directory` into `model` and `optimizer` (None: the weights
    only), sharded over any number of ranks. -> the step it was saved at.

    `model` must have the checkpoint's config and dtype and be sharded (or wrapped) already;
    its parameters keep their identity (and the embedding/LM-head tie), only their values change.
    The optimizer's hyperparameters (lr, betas, weight decay, per group) come from the
    checkpoint; its gradients are cleared. Every rank of the group must call it.
    FileNotFoundError / CheckpointError (a ValueError) as read_info; CheckpointError if the
    config, a tensor's shape or dtype, or the kind of optimizer does not match.
    """
    directory = Path(directory)
    base = _base_model(model)
    tied = _is_tied(base)
    group = _Group(process_group)
    info = read_info(directory)
    _check_config(directory, info, base)
    metadata = FileSystemReader(directory).read_metadata()
    if optimizer is not None:
        _check_optimizer(directory, info, metadata, optimizer)
        optimizer.zero_grad(set_to_none=True)     # get_state_dict must see no pending gradients
    model_state, optimizer_state = get_state_dict(model, [] if optimizer is None else optimizer)
    state = {"model": _untie(model_state, tied)}
    _check_tensors(directory, metadata, state["model"])
    if optimizer is not None:
        state["optimizer"] = optimizer_state
    _load(state, directory, process_group, single=not group.distributed)
    set_state_dict(model, [] if optimizer is None else optimizer,
                   model_state_dict=_retie(state["model"], tied),
                   optim_state_dict=state.get("optimizer", {}))
    if tied and base.lm_head.weight is not base.embed.weight:    # set_state_dict copies values only
        raise RuntimeError("loading broke the tie between model.lm_head.weight and model.embed.weight")
    return info["step"]

# --- book/11_many_processes.py:1460 (cell 36) ---
# ----------------------------------------------------------------------------------------------
# To and from the single-process checkpoint file of looplm.checkpoints

def to_single_process(directory, path):
    """Write the sharded checkpoint `directory` as a single-process looplm checkpoint file at
    `path` (what looplm.checkpoints.load_model reads), in this process, without a process group.
    -> path.

    The file holds the model config and the full weights in their stored dtype, like save_model;
    its trainer entry also holds "step" and, if the checkpoint has one, the optimizer state under
    "optimizer_fqn", keyed by parameter name (the form get_optimizer_state_dict returns; load it
    into a single-process optimizer with torch.distributed.checkpoint.state_dict.
    set_optimizer_state_dict). load_model(path) builds a float32 model; pass
    load_model(path, LoopLM(config).to(dtype)) to keep another dtype exactly.
    """
    directory, path = Path(directory), Path(path)
    info = read_info(directory)
    config = _stored_config(directory, info)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        whole = Path(scratch) / "whole.pt"
        with _single_process_quietly(True):
            dcp_to_torch_save(directory, whole)              # every tensor reassembled, no process group
        state = torch.load(whole, map_location="cpu", weights_only=True)
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict) or EMBED not in weights:
        raise CheckpointError(f"{directory} holds no model weights")
    model = LoopLM(config).to(weights[EMBED].dtype)
    weights = _retie(weights, info["tied_embeddings"] and config.tie_embeddings)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{directory} holds weights that do not fit its model config: {e}") from e
    trainer_state = {"model": model.state_dict(), "step": info["step"]}
    if state.get("optimizer") is not None:
        trainer_state[OPTIMIZER_KEY] = state["optimizer"]
    extra = {"step": info["step"], "converted_from": SHARDED_FORMAT, "saved_on_ranks": info.get("world_size"),
             "optimizer": info.get("optimizer")}
    return write_checkpoint(path, model, trainer_state=trainer_state, extra=extra)


def _trainer_optimizer_by_name(path, model, trainer):
    """The name-keyed state of a Trainer's AdamW (saved keyed by position), or None if there is
    none. The positions are mapped to names by rebuilding the Trainer's parameter groups for
    `model` and letting the optimizer check that the groups fit."""
    stored = trainer.get("optimizer")
    if not isinstance(stored, dict) or not stored.get("state"):
        return None
    optimizer = torch.optim.AdamW(_param_groups(model, 0.0))
    try:
        optimizer.load_state_dict(stored)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} holds an optimizer state whose parameter groups do not fit "
                              f"the model: {e}") from e
    return get_optimizer_state_dict(model, optimizer)


def from_single_process(path, directory, *, overwrite=False):
    """Write the single-process looplm checkpoint file `path` (save_model, save_checkpoint,
    to_single_process) as a sharded checkpoint directory `directory`, in this process, without a
    process group, atomically. -> the directory (a Path).

    The weights keep their stored dtype. The optimizer state comes along when the file has one:
    to_single_process's "optimizer_fqn", or a Trainer's AdamW state (mapped from positions to
    names); a file from save_model gives a checkpoint of the weights alone (load it with
    optimizer=None). The step is the file's trainer["step"] (0 if it has none).
    """
    path, directory = Path(path), Path(directory)
    payload = read_checkpoint(path)
    trainer = payload["trainer"]
    weights = trainer["model"]
    if not isinstance(weights.get(EMBED), torch.Tensor):
        raise CheckpointError(f"{path} holds no {EMBED} tensor")
    model = checkpoint_model(path, payload).to(weights[EMBED].dtype)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path} holds weights that do not fit its model config: {e}") from e
    tied = _is_tied(model)
    extra = payload.get("extra") if isinstance(payload.get("extra"), dict) else {}
    optimizer_state, kind = trainer.get(OPTIMIZER_KEY), extra.get("optimizer") or "AdamW"
    if optimizer_state is None:                       # a Trainer's file: its AdamW, keyed by position
        optimizer_state, kind = _trainer_optimizer_by_name(path, model, trainer), "AdamW"
    step = trainer.get("step", 0)
    step = _require_step(step if isinstance(step, int) else 0)
    state = {"model": _untie(model.state_dict(), tied)}
    if optimizer_state is not None:
        state["optimizer"] = optimizer_state
    temporary = _prepare(directory, overwrite)
    _save(state, temporary, single=True)
    info = _info(model, None, step, 1, tied, _model_dtype(model))
    info["optimizer"] = None if optimizer_state is None else kind
    info["world_size"] = None                     # not saved by ranks: converted from one file
    return Path(_finish(temporary, directory, info, overwrite))

# --- book/11_many_processes.py:1567 (cell 38) ---
def _sharded_model(config, seed, world):
    model = _build(config, seed, torch.float64)
    if world > 1:
        fsdp_shard(model, world)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train_steps(model, optimizer, config, first, n):
    """n AdamW steps on the global batches first .. first + n - 1, sliced for this rank. -> losses"""
    rank, world = dist.get_rank(), dist.get_world_size()
    objective, losses = TokenObjective(model), []
    for step in range(first, first + n):
        idx, targets = global_batch(step, 8, 12, config["vocab_size"])
        mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
        count = (targets != IGNORE_INDEX).sum()
        total, _ = objective(idx[mine], targets[mine])
        (total / count * world).backward()
        if world > 1 and not hasattr(next(model.parameters()), "full_tensor"):
            allreduce_gradients(model)
        optimizer.step()
        optimizer.zero_grad()
        reported = (total / count).detach().clone()
        dist.all_reduce(reported)
        losses.append(reported.item())
    return losses


@task
def checkpoint_round_trip(phase, directory, config, load=None, save=None, seed=0):
    """phase "train": 2 steps, save to directory/save, then 2 more steps (the run that never stopped).
    phase "resume": a model from another seed loads directory/load, (saves to directory/save), and
    takes the same 2 steps. -> {"step", "weights" (full, as lists, rank 0's view), "losses"}"""
    world = dist.get_world_size()
    model, optimizer = _sharded_model(config, seed if phase == "train" else seed + 1, world)
    if phase == "train":
        _train_steps(model, optimizer, config, 0, 2)
        save_sharded(model, optimizer, Path(directory) / save, step=2)
        step = 2
    else:
        step = load_sharded(model, optimizer, Path(directory) / load)
        if save:
            save_sharded(model, optimizer, Path(directory) / save, step=step)
    weights = {name: _full(p).flatten().tolist() for name, p in model.named_parameters()}
    return {"step": step, "weights": weights, "losses": _train_steps(model, optimizer, config, step, 2)}

# --- book/11_many_processes.py:1653 (cell 41) ---
@task
def data_parallel_cases(cases):
    """data_parallel_equals_one_process for each case (a dict of its arguments). -> [report]"""
    return [data_parallel_equals_one_process(**case) for case in cases]


@task
def ddp_reduced_values(config, loops=(1, 4), seed=0):
    """The gradient values DDP's buckets carry in one step, through a communication hook, for
    each S. -> [{S, reduced values, parameter values}]"""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    rows = []
    for n_loops in loops:
        model = TokenObjective(_build({**config, "n_loops": n_loops}, seed, torch.float64))
        ddp = nn.parallel.DistributedDataParallel(model, static_graph=True, bucket_cap_mb=0.001)
        seen = [0]

        def counting(state, bucket):
            seen[0] += bucket.buffer().numel()
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting)
        for step in range(2):
            seen[0] = 0
            total, count = ddp(*global_batch(seed + step, 4, 8, config["vocab_size"]))
            (total / count).backward()
        rows.append({"S": n_loops, "reduced values": seen[0],
                     "parameter values": sum(p.numel() for p in dict.fromkeys(model.parameters()))})
    return rows


@task
def run_in_file(path, function, kwargs=None):
    """Import the Python file at `path` on every rank and run its `function(**kwargs)`: how the
    graded tests of this chapter's exercises run the reader's code in several processes."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_run_in_file_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function)(**(kwargs or {}))


@task
def fails_on_rank(rank=1):
    """A task that raises on one rank (for testing launch)."""
    if dist.get_rank() == rank:
        raise RuntimeError(f"rank {rank} stops here on purpose")
    dist.barrier()
    return "unreachable"


@task
def sleeps(seconds=600):
    """A task that hangs (for testing launch's timeout)."""
    time.sleep(seconds)
    return "woke"

# --- book/11a_appendix_processes.py:105 (cell 3) ---
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

# --- book/11a_appendix_processes.py:205 (cell 6) ---
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

# --- book/11a_appendix_processes.py:415 (cell 8) ---
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

# --- book/11a_appendix_processes.py:461 (cell 11) ---
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

# --- book/11_many_processes.py:1933 (cell 53) ---
if __name__ == "__main__" and "get_ipython" not in globals() and globals().get("__spec__") is not None:
    main(sys.argv[1:])                    # a worker, started by torchrun through launch()
