# Generated from book/04a_appendix_engineering.py, book/07_inference.py, book/09_mixture_of_experts.py, book/10a_appendix_kernels.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['MinimalLoopedLM', 'minimal_from_looplm', 'bench_train', 'format_train_table', 'plot_train', 'BENCHMARKS', 'main', 'DECODE_SETTINGS', 'decode_quality', 'bench_decode', 'format_decode_table', 'plot_decode', 'bench_moe', 'format_moe_table', 'plot_moe', 'kernel_checks', 'format_kernel_checks', 'bench_kernels', 'format_kernel_table', 'plot_kernels', 'bench_exit_update', 'format_exit_update_table']
# fmt: on

import argparse
import inspect
import math
import os
import statistics
import statistics as _statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from looplm.backprop import make_loop_loss
from looplm.block import apply_rope, rope_angles
from looplm.checkpoints import load_model_flag
from looplm.checks import require_int
from looplm.data import TASKS, TASK_VOCAB, decode_answer, make_splits, make_task
from looplm.exits import make_exit_rule
from looplm.generate import generate
from looplm.kernels.attention import flash_attention
from looplm.kernels.cross_entropy import multi_exit_cross_entropy_reference, multi_exit_linear_cross_entropy
from looplm.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference
from looplm.kernels.rope import rope
from looplm.kernels.runtime import INTERPRET, runs_in_triton
from looplm.kernels.swiglu import swiglu, swiglu_reference
from looplm.kernels.update import masked_update, masked_update_reference
from looplm.model import LoopLM, LoopLMConfig
from looplm.moe import MoEFeedForward
from looplm.train import TrainConfig, default_loss, task_batches, train_two_stage

# --- book/04a_appendix_engineering.py:2513 (cell 94) ---
class _Norm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MinimalLoopedLM(nn.Module):
    """A looped LM in plain PyTorch: embed -> one pre-norm block x n_loops -> norm -> tied head.

    No input checks, no registries, one readout. The baseline of `python -m looplm.bench train`.
    """

    def __init__(self, vocab_size, d_model, n_heads, d_hidden, n_loops, max_seq_len, eps=1e-6):
        super().__init__()
        self.n_heads, self.n_loops = n_heads, n_loops
        self.embed = nn.Embedding(vocab_size, d_model)
        self.norm1, self.norm2, self.norm = _Norm(d_model, eps), _Norm(d_model, eps), _Norm(d_model, eps)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(d_model, d_hidden, bias=False)
        self.up = nn.Linear(d_model, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)
        head_dim = d_model // n_heads
        inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, hs/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def block(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)

        def rope(t):                                                # (B, nh, T, hs)
            a, b = t.chunk(2, dim=-1)
            return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)     # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))

    def forward(self, idx):
        T = idx.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]
        h = self.embed(idx)                                         # (B, T, C)
        for _ in range(self.n_loops):
            h = self.block(h, cos, sin)
        return F.linear(self.norm(h), self.embed.weight)            # (B, T, V), tied head

# --- book/04a_appendix_engineering.py:2588 (cell 96) ---
def minimal_from_looplm(model):
    """A MinimalLoopedLM holding a LoopLM's weights (one pre-norm core block, tied head, no
    prelude, coda, injection or gate): same logits as model(idx).logits[-1]."""
    c = model.config
    if (c.n_prelude, c.n_core, c.n_coda, c.norm_style, c.tie_embeddings, c.injection, c.exit_gate) != \
            (0, 1, 0, "pre", True, "none", False) or c.init_state != "embedding":
        raise ValueError("the minimal model mirrors a LoopLM with one pre-norm core block, a tied head "
                         "and no prelude, coda, injection or exit gate")
    block = model.core[0]
    minimal = MinimalLoopedLM(c.vocab_size, c.d_model, c.n_heads, block.d_hidden, c.n_loops, c.max_seq_len, c.eps)
    with torch.no_grad():
        minimal.embed.weight.copy_(model.embed.weight)
        minimal.norm1.weight.copy_(block.norms[0].weight)
        minimal.norm2.weight.copy_(block.norms[1].weight)
        minimal.norm.weight.copy_(model.norm.weight)
        for mine, theirs in ((minimal.qkv, block.attn.qkv), (minimal.proj, block.attn.proj),
                             (minimal.gate, block.mlp.gate), (minimal.up, block.mlp.up),
                             (minimal.down, block.mlp.down)):
            mine.weight.copy_(theirs.weight)
    return minimal.to(next(model.parameters()).device)

# --- book/04a_appendix_engineering.py:2618 (cell 98) ---
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _train_step(model, loss_fn, optimizer, idx, targets):
    def step():
        loss = loss_fn(model, idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return step


def bench_train(d_model=128, n_heads=4, n_loops=4, batch_size=16, seq_len=64, vocab_size=256,
                steps=10, repeats=7, device="cpu", seed=0):
    """Training throughput of LoopLM (two loss paths) against MinimalLoopedLM, in one run.

    -> dict with "rows": [(name, steps per second, tokens per second)], the minimal model first,
    "max_logit_difference" (identical weights, last-step logits) and "settings".
    """
    for name, value in (("steps", steps), ("repeats", repeats), ("batch_size", batch_size), ("seq_len", seq_len)):
        require_int(name, value, 1)
    torch.manual_seed(seed)
    config = LoopLMConfig(vocab_size, d_model, n_heads, n_loops=n_loops, max_seq_len=seq_len)
    models = {name: LoopLM(config).to(device) for name in ("default", "lean")}
    models["lean"].load_state_dict(models["default"].state_dict())
    minimal = minimal_from_looplm(models["default"])
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    targets = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    with torch.no_grad():
        difference = (models["default"](idx).logits[-1] - minimal(idx)).abs().max().item()

    lean_loss = make_loop_loss()
    contestants = {
        "minimal looped model (plain PyTorch)": (minimal, lambda m, i, t: F.cross_entropy(
            m(i).flatten(0, 1), t.flatten())),
        "LoopLM + make_loop_loss()": (models["lean"], lambda m, i, t: lean_loss(m, i, t)[0]),
        "LoopLM + default_loss": (models["default"], lambda m, i, t: default_loss(m, i, t)[0]),
    }
    steps_fns = {}
    for name, (model, loss_fn) in contestants.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        steps_fns[name] = _train_step(model, loss_fn, optimizer, idx, targets)
        for _ in range(2):                                          # warm up
            steps_fns[name]()
    seconds = {name: [] for name in contestants}
    order = list(contestants)
    for turn in range(repeats):
        for name in (order if turn % 2 == 0 else order[::-1]):
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                steps_fns[name]()
            _sync(device)
            seconds[name].append((time.perf_counter() - start) / steps)
    rows = [(name, 1 / statistics.median(s), batch_size * seq_len / statistics.median(s))
            for name, s in seconds.items()]
    settings = dict(d_model=d_model, n_heads=n_heads, n_loops=n_loops, batch_size=batch_size,
                    seq_len=seq_len, vocab_size=vocab_size, steps=steps, repeats=repeats,
                    device=str(device), threads=torch.get_num_threads())
    return {"rows": rows, "max_logit_difference": difference, "settings": settings}

# --- book/04a_appendix_engineering.py:2689 (cell 100) ---
def format_train_table(result):
    s = result["settings"]
    lines = [f"training throughput: d_model {s['d_model']}, {s['n_heads']} heads, {s['n_loops']} loops, "
             f"batch {s['batch_size']} x {s['seq_len']} tokens, vocab {s['vocab_size']}, {s['device']} "
             f"({s['threads']} threads); median of {s['repeats']} turns of {s['steps']} steps",
             f"same weights, last-step logits: max |difference| = {result['max_logit_difference']:.1e}",
             "",
             f"{'model':40s} {'steps/s':>9s} {'tokens/s':>10s} {'overhead':>9s}"]
    base = result["rows"][0][1]
    for name, steps_per_s, tokens_per_s in result["rows"]:
        overhead = "" if steps_per_s == base and name == result["rows"][0][0] else f"{base / steps_per_s - 1:+.1%}"
        lines.append(f"{name:40s} {steps_per_s:9.2f} {tokens_per_s:10,.0f} {overhead:>9s}")
    return "\n".join(lines)


def plot_train(result, path):
    from matplotlib.figure import Figure

    names = [row[0] for row in result["rows"]]
    fig = Figure(figsize=(7, 2.8))
    ax = fig.add_subplot()
    ax.barh(names[::-1], [row[2] for row in result["rows"]][::-1], color=["C2", "C1", "C0"][:len(names)])
    ax.set(xlabel="training tokens per second", title="python -m looplm.bench train")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

# --- book/04a_appendix_engineering.py:2731 (cell 102) ---
def _train_arguments(parser):
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed turn (default 10)")
    parser.add_argument("--repeats", type=int, default=7, help="timed turns per model (default 7)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--n-loops", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", default="build/bench/train.png", help="bar plot (default build/bench/train.png)")


def _check_train_flags(args):
    """ValueError naming the flag, for settings the train benchmark cannot run."""
    for dest in ("steps", "repeats", "d_model", "n_heads", "n_loops", "batch_size", "seq_len", "vocab_size"):
        value = getattr(args, dest)
        if value < 1:
            raise ValueError(f"--{dest.replace('_', '-')} must be >= 1, got {value}")
    if args.d_model % args.n_heads:
        raise ValueError(f"--n-heads {args.n_heads} must divide --d-model {args.d_model}")
    if (args.d_model // args.n_heads) % 2:
        raise ValueError(f"--d-model / --n-heads = {args.d_model // args.n_heads} must be even "
                         f"(rotary embeddings rotate pairs of dimensions)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda (cuda:N), got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")


def _train_command(args):
    _check_train_flags(args)
    result = bench_train(d_model=args.d_model, n_heads=args.n_heads, n_loops=args.n_loops,
                         batch_size=args.batch_size, seq_len=args.seq_len, vocab_size=args.vocab_size,
                         steps=args.steps, repeats=args.repeats, device=args.device)
    print(format_train_table(result))
    print(f"\nsaved {plot_train(result, args.out)}")
    return 0


# name -> (help, add_arguments(parser), run(args) -> exit status)
BENCHMARKS = {"train": ("training throughput: LoopLM against a minimal looped model", _train_arguments,
                        _train_command)}


def main(argv=None):
    """python -m looplm.bench <benchmark> [options]; see --help."""
    parser = argparse.ArgumentParser(prog="python -m looplm.bench", description="looplm benchmarks")
    commands = parser.add_subparsers(dest="benchmark", required=True)
    for name, (help_text, add_arguments, _) in BENCHMARKS.items():
        add_arguments(commands.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        return BENCHMARKS[args.benchmark][2](args)
    except (ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError) as e:
        print(f"python -m looplm.bench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"python -m looplm.bench: stopped: {e}", file=sys.stderr)
        return 1

# --- book/07_inference.py:1375 (cell 53) ---
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

# --- book/07_inference.py:1521 (cell 55) ---
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

# --- book/09_mixture_of_experts.py:1005 (cell 43) ---
def _median_seconds(fns, repeats, device):
    """{name: median seconds of fn()} over `repeats` turns, the order alternating each turn."""
    for fn in fns.values():                                        # warm up
        fn()
    times, order = {name: [] for name in fns}, list(fns)
    for turn in range(repeats):
        for name in (order if turn % 2 == 0 else order[::-1]):
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_moe(n_experts=16, top_k=2, d_model=64, d_expert=64, tokens=(128, 1024), batch_size=16, seq_len=64,
              repeats=5, device="cpu", seed=0):
    """The MoE layer on each token count of `tokens` (grouped against loop), a training step and
    decoding (MoE against dense at equal active weights). -> dict with "rows": [(what, contestant,
    seconds, relative)] and "settings"."""
    for name, value in (("n_experts", n_experts), ("top_k", top_k), ("repeats", repeats), *(("tokens", n) for n in tokens)):
        require_int(name, value, 1)
    torch.manual_seed(seed)
    rows = []
    layers = {impl: MoEFeedForward(d_model, n_experts, top_k, d_expert, impl=impl).to(device) for impl in ("loop", "grouped")}
    layers["grouped"].load_state_dict(layers["loop"].state_dict())
    for n in tokens:
        x = torch.randn(n, d_model, device=device, requires_grad=True)
        layer_fns = {f"{impl}, {n_experts} experts top-{top_k}": (lambda m=m, x=x: m(x).square().sum().backward())
                     for impl, m in layers.items()}
        for name, seconds in _median_seconds(layer_fns, repeats, device).items():
            rows.append((f"MoE layer, {n} tokens, fwd + bwd", name, seconds))
    base = dict(vocab_size=256, d_model=d_model, n_heads=4, n_loops=4, max_seq_len=seq_len)
    hidden = 8 * (-(-8 * d_model // 24))                           # the dense default, 8/3 d
    models = {"dense": LoopLM(LoopLMConfig(**base)).to(device),
              f"MoE, 8 experts top-{top_k}": LoopLM(LoopLMConfig(**base, mlp="moe", n_experts=8, top_k=top_k,
                                                                  d_expert=hidden // top_k)).to(device)}
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (batch_size, seq_len), generator=generator).to(device)
    def loss_with_aux(model, idx, targets):                    # as the Trainer: + aux_weight * aux_loss
        loss = default_loss(model, idx, targets)[0]
        return loss if model.last_aux_loss is None else loss + 0.01 * model.last_aux_loss

    step_fns = {}
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step_fns[name] = _train_step(model, loss_with_aux, optimizer, idx, idx)
    for name, seconds in _median_seconds(step_fns, repeats, device).items():
        rows.append((f"training step, batch {batch_size} x {seq_len}", name, seconds))
    for batch in (1, batch_size):
        prompts = idx[:batch, :16]
        decode_fns = {name: (lambda m=m: generate(m.eval(), prompts, 32)) for name, m in models.items()}
        for name, seconds in _median_seconds(decode_fns, repeats, device).items():
            rows.append((f"decoding 32 tokens, batch {batch}", name, seconds))
    out = []
    for what, name, seconds in rows:
        first = next(s for w, _, s in rows if w == what)
        out.append((what, name, seconds, seconds / first))
    return {"rows": out, "settings": dict(n_experts=n_experts, top_k=top_k, d_model=d_model, d_expert=d_expert,
                                          tokens=tokens, device=str(device), threads=torch.get_num_threads())}


def format_moe_table(result):
    s = result["settings"]
    lines = [f"MoE benchmark on {s['device']} ({s['threads']} threads); median of alternating turns",
             f"{'':36s} {'contestant':26s} {'ms':>9s} {'relative':>9s}"]
    for what, name, seconds, relative in result["rows"]:
        lines.append(f"{what:36s} {name:26s} {seconds * 1e3:9.2f} {relative:9.2f}")
    return "\n".join(lines)


def plot_moe(result, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.2))
    ax = fig.add_subplot()
    labels = [f"{what}: {name}" for what, name, _, _ in result["rows"]]
    ax.barh(labels[::-1], [row[3] for row in result["rows"]][::-1], color="C0")
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set(xlabel="time relative to the first contestant of its group", title="python -m looplm.bench moe")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _moe_arguments(parser):
    parser.add_argument("--experts", type=int, default=16, help="experts of the layer benchmark (default 16)")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 1024],
                        help="token counts of the layer benchmark (default 128 1024)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--out", default="build/bench/moe.png", help="bar plot (default build/bench/moe.png)")


def _moe_command(args):
    for flag, value in (("--experts", args.experts), ("--top-k", args.top_k), ("--repeats", args.repeats),
                        *(("--tokens", n) for n in args.tokens)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.top_k > args.experts:
        raise ValueError(f"--top-k {args.top_k} must be <= --experts {args.experts}")
    result = bench_moe(n_experts=args.experts, top_k=args.top_k, tokens=tuple(args.tokens), repeats=args.repeats,
                       device=args.device)
    print(format_moe_table(result))
    print(f"\nsaved {plot_moe(result, args.out)}")
    return 0


BENCHMARKS["moe"] = ("mixture of experts: grouped against looped experts, MoE against dense", _moe_arguments,
                     _moe_command)

# --- book/10a_appendix_kernels.py:1556 (cell 23) ---
def kernel_checks(device="cpu"):
    """[(kernel, case, largest relative error, tolerance)] of every kernel against its float64
    reference, forward and backward (the interpreter on a CPU). Needs the kernels runnable here."""
    g = torch.Generator().manual_seed(0)

    def worst(fn, reference, shapes, dtype, integer=(), grad=True):
        inputs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        upstream = None
        results = []
        for f, dt in ((fn, dtype), (reference, torch.float64)):
            args = [x.to(device, dt, copy=True).requires_grad_(grad) for x in inputs]
            outs = f(*args, *integer)
            outs = outs if isinstance(outs, tuple) else (outs,)
            if upstream is None:
                upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(device) for o in outs]
            if grad:
                sum((o.double() * u).sum() for o, u in zip(outs, upstream)).backward()
            results.append([*outs, *(a.grad for a in args if grad)])
        errors = []
        for a, b in zip(*results):
            diff, scale = (a.double() - b.double()).abs().max().item(), b.double().abs().max().item()
            errors.append(diff / scale if scale > 0 else diff)
        return max(errors)

    cos, sin = (t.to(device) for t in rope_angles(12, 11))
    targets = torch.randint(0, 53, (13,), generator=g).to(device)
    targets[::4] = -100
    active = (torch.rand(5, 3, generator=g) < 0.6).to(device)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    cases = [
        ("add_rmsnorm", "[3, 7, 24] + injection", lambda d: worst(lambda h, j, w: add_rmsnorm(h, j, w, 1e-6),
         lambda h, j, w: add_rmsnorm_reference(h, j, w, 1e-6), [(3, 7, 24), (3, 7, 24), (24,)], d)),
        ("swiglu", "[3, 5, 77]", lambda d: worst(swiglu, swiglu_reference, [(3, 5, 77), (3, 5, 77)], d)),
        ("rope", "[2, 3, 11, 12]", lambda d: worst(lambda x: rope(x, cos.to(d), sin.to(d)),
         lambda x: apply_rope(x, cos.double(), sin.double()), [(2, 3, 11, 12)], d)),
        ("flash_attention", "[2, 3, 13, 24], causal", lambda d: worst(flash_attention, sdpa, [(2, 3, 13, 24)] * 3, d)),
        ("multi_exit_linear_cross_entropy", "S 3, N 13, D 24, V 53, ignored rows",
         lambda d: worst(multi_exit_linear_cross_entropy, multi_exit_cross_entropy_reference, [(3, 13, 24), (53, 24)],
                         d, integer=(targets,))),
        ("masked_update", "[5, 3, 37], 40% exited", lambda d: worst(
            lambda h, x, u: masked_update(h, x, u, active), lambda h, x, u: masked_update_reference(h, x, u, active),
            [(5, 3, 37)] * 3, d, grad=False)),                       # decoding: no backward
    ]
    rows = []
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if torch.device(device).type == "cuda" else ())
    for name, case, run in cases:
        for dtype in dtypes:
            tolerance = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
            rows.append((name, f"{case}, {str(dtype).removeprefix('torch.')}", run(dtype), tolerance))
    return rows


def format_kernel_checks(rows):
    lines = [f"{'kernel':32s} {'case':48s} {'error':>9s} {'tolerance':>9s}"]
    for name, case, error, tolerance in rows:
        lines.append(f"{name:32s} {case:48s} {error:9.1e} {tolerance:9.1e}  {'ok' if error <= tolerance else 'FAIL'}")
    return "\n".join(lines)

# --- book/10a_appendix_kernels.py:1642 (cell 25) ---
def _gpu_ceilings(dtype):
    """(copy bandwidth in bytes/s, matmul FLOP/s) measured on this GPU."""
    from triton.testing import do_bench
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy = 2 * x.numel() / (do_bench(lambda: y.copy_(x)) * 1e-3)
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    matmul = 2 * 8192**3 / (do_bench(lambda: a @ b) * 1e-3)
    return copy, matmul


def _timed(fn, check=None):
    """(milliseconds, peak MB allocated beyond the inputs, None) or (None, None, why)."""
    from triton.testing import do_bench
    try:
        if check is not None:
            problem = check()
            if problem:
                return None, None, problem
        ms = do_bench(fn, warmup=10, rep=50)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return ms, (torch.cuda.max_memory_allocated() - base) / 2**20, None
    except Exception as e:                        # a contestant that fails says why, the rest run on
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"


def _liger(name):
    """A Liger-Kernel object by dotted path, or None when Liger is not installed."""
    try:
        module, _, attribute = name.rpartition(".")
        return getattr(__import__(module, fromlist=[attribute]), attribute)
    except (ImportError, AttributeError):
        return None


def _agree(a, b, dtype):
    """'' when a equals b within 8 roundings of dtype (relative to b's largest value), else a message."""
    a, b = (t.double() for t in (a, b))
    error = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return "" if error <= 8 * torch.finfo(dtype).eps else f"disagrees with eager: relative error {error:.1e}"


def bench_kernels(dtype=torch.bfloat16, quick=False, compile=True, seed=0):
    """Every kernel against eager, torch.compile and Liger-Kernel on this GPU. -> dict with "rows":
    [(kernel, contestant, mode, ms, peak MB, roofline fraction or None, note)], "ceilings", "settings".
    quick=True: smaller sizes (a smoke run)."""
    if not torch.cuda.is_available():
        raise ValueError("bench_kernels times kernels on a GPU, and this machine has none")
    torch.manual_seed(seed)
    dev, size = "cuda", dtype.itemsize
    copy_bw, matmul_peak = _gpu_ceilings(dtype)
    rows = []

    def add(kernel, contestants, bytes_or_flops, kind):
        """contestants: {name: (forward, forward_and_backward, output for the check)}."""
        reference = None
        for name, (forward, both, output) in contestants.items():
            if reference is None:
                reference = output()
            check = (lambda output=output: _agree(output(), reference, dtype)) if reference is not None else None
            for mode, fn in (("fwd", forward), ("fwd+bwd", both)):
                if fn is None:
                    continue
                ms, mb, note = _timed(fn, check if mode == "fwd" else None)
                work = bytes_or_flops[mode]
                peak = copy_bw if kind == "bytes" else matmul_peak
                fraction = None if ms is None else work / (ms * 1e-3) / peak
                rows.append((kernel, name, mode, ms, mb, fraction, note or ""))

    def compiled(fn):
        return torch.compile(fn) if compile else None

    def with_backward(fn, inputs, upstream):
        def run():
            outs = fn()
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.backward(outs, upstream[:len(outs)])
            for x in inputs:
                x.grad = None
        return run

    # 1. RMSNorm + injection, 16384 x 4096
    N, D = (4096, 1024) if quick else (16384, 4096)
    h, inj = (torch.randn(N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    w = torch.ones(D, device=dev, dtype=dtype, requires_grad=True)
    up = [torch.randn(N, D, device=dev, dtype=dtype) for _ in range(2)]
    eager = lambda: (lambda u: (u, F.rms_norm(u, (D,), w, 1e-6)))(h + inj)
    fused = lambda: add_rmsnorm(h, inj, w, 1e-6)
    contestants = {"torch eager (add, F.rms_norm)": eager, "triton fused": fused}
    if compile:
        contestants["torch.compile"] = torch.compile(eager)
    liger = _liger("liger_kernel.ops.rms_norm.LigerRMSNormFunction")
    if liger is not None:
        contestants["Liger (add, LigerRMSNorm)"] = lambda: (lambda u: (u, liger.apply(u, w, 1e-6)))(h + inj)
    add("RMSNorm + injection", {name: (lambda f=f: f(), with_backward(f, (h, inj, w), up), lambda f=f: f()[1])
                                for name, f in contestants.items()},
        {"fwd": 4 * N * D * size, "fwd+bwd": 8 * N * D * size}, "bytes")

    # 2. SwiGLU, 16384 x 8192 (hidden)
    N, H = (4096, 2048) if quick else (16384, 8192)
    gate, upp = (torch.randn(N, H, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    dy = [torch.randn(N, H, device=dev, dtype=dtype)]
    eager = lambda: F.silu(gate) * upp
    contestants = {"torch eager": eager, "triton fused": lambda: swiglu(gate, upp)}
    if compile:
        contestants["torch.compile"] = torch.compile(eager)
    liger = _liger("liger_kernel.ops.swiglu.LigerSiLUMulFunction")
    if liger is not None:
        contestants["Liger"] = lambda: liger.apply(gate, upp)
    add("SwiGLU", {name: (f, with_backward(f, (gate, upp), dy), f) for name, f in contestants.items()},
        {"fwd": 3 * N * H * size, "fwd+bwd": 8 * N * H * size}, "bytes")

    # 3. rotary embedding of q, [8, 32, 2048, 128]
    B, Hh, T, hs = (2, 8, 1024, 128) if quick else (8, 32, 2048, 128)
    q = torch.randn(B, Hh, T, hs, device=dev, dtype=dtype, requires_grad=True)
    cos, sin = (t.to(dev, dtype) for t in rope_angles(hs, T))
    dq = [torch.randn_like(q)]
    eager = lambda: apply_rope(q, cos, sin)
    contestants = {"torch eager": eager, "triton": lambda: rope(q, cos, sin)}
    if compile:
        contestants["torch.compile"] = torch.compile(eager)
    add("rotary embedding", {name: (f, with_backward(f, (q,), dq), f) for name, f in contestants.items()},
        {"fwd": 2 * q.numel() * size, "fwd+bwd": 4 * q.numel() * size}, "bytes")

    # 4. causal attention, [4, 16, 2048, 64]
    B, Hh, T, hs = (2, 8, 1024, 64) if quick else (4, 16, 2048, 64)
    qkv = [torch.randn(B, Hh, T, hs, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]
    do = [torch.randn(B, Hh, T, hs, device=dev, dtype=dtype)]
    sdpa = lambda: F.scaled_dot_product_attention(*qkv, is_causal=True)
    flash = lambda: flash_attention(*qkv)
    flops = 4 * B * Hh * T * T * hs / 2                                   # causal: half the square
    add("causal attention", {name: (f, with_backward(f, qkv, do), f) for name, f in
                             {"torch SDPA": sdpa, "triton flash": flash}.items()},
        {"fwd": flops, "fwd+bwd": 3.5 * flops}, "flops")

    # 5. four exits' linear cross-entropy, N 8192, D 2048, V 50304
    S, N, D, V = (4, 2048, 1024, 50304) if quick else (4, 8192, 2048, 50304)
    states = torch.randn(S, N, D, device=dev, dtype=dtype, requires_grad=True)
    head = (torch.randn(V, D, device=dev, dtype=dtype) / D**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), device=dev)

    def per_exit():
        return torch.stack([F.cross_entropy(F.linear(states[s], head).float(), targets, reduction="none")
                            for s in range(S)]).mean()

    ours = lambda: multi_exit_linear_cross_entropy(states, head, targets).mean()
    contestants = {"torch eager, per exit": per_exit, "triton multi-exit": ours}
    if compile:
        contestants["torch.compile, per exit"] = torch.compile(per_exit)
    liger = _liger("liger_kernel.transformers.fused_linear_cross_entropy.LigerFusedLinearCrossEntropyLoss")
    if liger is not None:
        loss = liger()
        contestants["Liger FLCE, exits concatenated"] = lambda: loss(head, states.view(S * N, D), targets.repeat(S))
    one = torch.ones((), device=dev)
    add("4-exit linear cross-entropy", {name: (f, with_backward(f, (states, head), [one]), f)
                                        for name, f in contestants.items()},
        {"fwd": 2 * S * N * V * D, "fwd+bwd": 6 * S * N * V * D}, "flops")

    # 6. a full training step of a looped model: kernels="triton" against torch.compile
    rows.extend(_bench_training_step(dtype, quick, compile, seed))
    return {"rows": rows, "ceilings": (copy_bw, matmul_peak),
            "settings": dict(dtype=str(dtype), device=torch.cuda.get_device_name(), quick=quick,
                             torch=torch.__version__, triton=__import__("triton").__version__,
                             liger=_liger("liger_kernel.__version__") or "not installed")}


def _bench_training_step(dtype, quick, compile, seed):
    from triton.testing import do_bench
    options = dict(vocab_size=50304, d_model=512 if quick else 1024, n_heads=8 if quick else 16, n_loops=4,
                   injection="add", init_state="zeros", max_seq_len=1024)
    B, T = (4, 512) if quick else (8, 1024)
    idx = torch.randint(0, 50304, (B, T + 1), device="cuda")
    rows = []
    torch.manual_seed(seed)
    reference = LoopLM(LoopLMConfig(**options)).to("cuda", dtype)
    contestants = {"torch eager": (reference, {}), "triton kernels, no logits": (None, dict(return_logits=False))}
    if compile:
        contestants["torch.compile"] = (torch.compile(reference), {})
    for name, (model, kwargs) in contestants.items():
        if model is None:
            model = LoopLM(LoopLMConfig(**options, kernels="triton")).to("cuda", dtype)
            model.load_state_dict(reference.state_dict())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, kwargs=kwargs, optimizer=optimizer):
            loss = model(idx[:, :-1], idx[:, 1:], **kwargs).step_losses.mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        try:
            ms = do_bench(step, warmup=3, rep=30)
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            rows.append(("training step", name, f"batch {B} x {T}", ms, torch.cuda.max_memory_allocated() / 2**20,
                         None, ""))
        except Exception as e:
            rows.append(("training step", name, f"batch {B} x {T}", None, None, None,
                         f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"))
    return rows


def format_kernel_table(result):
    copy_bw, matmul = result["ceilings"]
    s = result["settings"]
    lines = [f"kernels on {s['device']}, {s['dtype']}; torch {s['torch']}, triton {s['triton']}, Liger {s['liger']}",
             f"measured ceilings: copy {copy_bw / 1e12:.2f} TB/s, matmul {matmul / 1e12:.0f} TFLOP/s",
             f"{'kernel':28s} {'contestant':32s} {'mode':14s} {'ms':>8s} {'vs first':>8s} {'peak MB':>8s} "
             f"{'roofline':>8s}"]
    for kernel, name, mode, ms, mb, fraction, note in result["rows"]:
        first = next((r[3] for r in result["rows"] if r[0] == kernel and r[2] == mode and r[3] is not None), None)
        if ms is None:
            lines.append(f"{kernel:28s} {name:32s} {mode:14s} {note}")
            continue
        ratio = f"{first / ms:7.2f}x" if first else ""
        roof = "" if fraction is None else f"{fraction:8.0%}"
        lines.append(f"{kernel:28s} {name:32s} {mode:14s} {ms:8.3f} {ratio:>8s} {mb:8.0f} {roof:>8s}")
    lines.append("vs first: speed relative to the first contestant of the group (above 1: faster); roofline: "
                 "bytes (or FLOP) the function needs, over the time, as a share of the measured ceiling")
    return "\n".join(lines)


def plot_kernels(result, path):
    from matplotlib.figure import Figure
    groups = {}
    for kernel, name, mode, ms, *_ in result["rows"]:
        if ms is not None and mode != "fwd":
            groups.setdefault(kernel, []).append((name, ms))
    fig = Figure(figsize=(8, 0.5 + 0.35 * sum(len(v) for v in groups.values())))
    ax = fig.add_subplot()
    labels, values = [], []
    for kernel, entries in groups.items():
        base = entries[0][1]
        for name, ms in entries:
            labels.append(f"{kernel}: {name}")
            values.append(base / ms)
    ax.barh(labels[::-1], values[::-1], color="C0")
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set(xlabel="speed relative to the first contestant (forward + backward)",
           title=f"python -m looplm.bench kernels ({result['settings']['device']})")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

# --- book/10a_appendix_kernels.py:1906 (cell 27) ---
def bench_exit_update(model, batch=64, repeats=7, seeds=(0, 1, 2)):
    """One decoding position's loop under per-token exit, two ways, for each seed's draw of the exit
    steps. -> dict with "rows": [(strategy, [seconds per seed], [relative to indexing per seed])] and
    "settings"; for each seed both strategies end with every row at its own exit state (checked)."""
    require_int("batch", batch, 1)
    require_int("repeats", repeats, 1)
    c = model.config
    weight = model.lm_head.weight
    device, dtype, S = weight.device, weight.dtype, c.n_loops
    cos, sin = model.rope(1)
    kernel_step = "active" in inspect.signature(model.step).parameters
    names = ("drop exited rows (indexing)", "run all rows, masked update")
    seconds = {name: [] for name in names}
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        exit_at = torch.randint(1, S + 1, (batch,), generator=g).to(device)    # each token's exit step
        x0 = torch.randn(batch, 1, c.d_model, generator=g).to(device, dtype)

        @torch.no_grad()
        def by_index():
            out = torch.empty_like(x0)
            h, inputs, live = model.init_state(x0), x0, torch.arange(batch, device=device)
            for s in range(1, S + 1):
                h = model.step(h, inputs, cos, sin)
                leaving = exit_at[live] == s
                out[live[leaving]] = h[leaving]
                keep = ~leaving
                if not keep.any():                                             # a host synchronisation
                    break
                live, h, inputs = live[keep], h[keep], inputs[keep]
            return out

        @torch.no_grad()
        def by_mask():
            h = model.init_state(x0)
            for s in range(1, S + 1):
                active = (exit_at >= s)[:, None]                               # (B, 1): still running
                if kernel_step:
                    h = model.step(h, x0, cos, sin, active=active)
                else:
                    h = torch.where(active[..., None], model.step(h, x0, cos, sin), h)
            return h

        a, b = by_index(), by_mask()
        if ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() > 1e-4:
            raise RuntimeError("the two exit strategies disagree; the benchmark would compare different work")
        for name, t in _median_seconds(dict(zip(names, (by_index, by_mask))), repeats, device).items():
            seconds[name].append(t)
    first = seconds[names[0]]
    return {"rows": [(name, t, [x / y for x, y in zip(t, first)]) for name, t in seconds.items()],
            "settings": dict(batch=batch, n_loops=S, d_model=c.d_model, device=str(device), dtype=str(dtype),
                             kernels=c.kernels, threads=torch.get_num_threads(), seeds=tuple(seeds))}


def format_exit_update_table(result):
    s = result["settings"]
    lines = [f"per-token exit, one decoding position: batch {s['batch']}, {s['n_loops']} steps, d_model {s['d_model']}, "
             f"kernels={s['kernels']!r}, {s['device']} ({s['threads']} threads), {s['dtype']}; exit steps drawn "
             f"uniformly, seeds {', '.join(map(str, s['seeds']))}",
             f"{'strategy':32s} {'ms per seed':>26s}   {'relative per seed':>20s}"]
    for name, seconds, relative in result["rows"]:
        lines.append(f"{name:32s} {' '.join(f'{t * 1e3:8.3f}' for t in seconds):>26s}   "
                     f"{' '.join(f'{r:6.2f}' for r in relative):>20s}")
    return "\n".join(lines)


def _kernels_arguments(parser):
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (timings) or cpu (interpreted checks; default: cuda when there is one)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--repeats", type=int, default=7, help="turns of the decoding benchmark (default 7)")
    parser.add_argument("--out", default="build/bench/kernels.png", help="bar plot (default build/bench/kernels.png)")


def _kernels_command(args):
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine; use --device cpu")
    if args.device == "cpu" and not INTERPRET and os.environ.get("TRITON_INTERPRET") is None:
        # the kernels were defined when looplm was imported, without the interpreter: run the
        # command again in a process that has it from the start
        flags = ["--device", "cpu", "--repeats", str(args.repeats), "--out", args.out]
        flags += ["--quick"] * args.quick + ["--no-compile"] * args.no_compile
        again = subprocess.run([sys.executable, "-m", "looplm.bench", "kernels", *flags],
                               env={**os.environ, "TRITON_INTERPRET": "1"})
        return again.returncode
    failed = False
    if args.device == "cpu":
        print("Kernel timings need a GPU: on a CPU the kernels run in Triton's interpreter, whose speed says\n"
              "nothing about a GPU's. Running the interpreted correctness checks instead.\n")
    if not runs_in_triton(torch.zeros(1, device=args.device)):
        print("The kernels cannot run here (Triton missing, or TRITON_INTERPRET=1 was not set before they were "
              "imported): no checks.")
        failed = True
    else:
        rows = kernel_checks(args.device)
        print(format_kernel_checks(rows))
        failed = any(error > tolerance for *_, error, tolerance in rows)
    if args.device == "cuda":
        result = bench_kernels(quick=args.quick, compile=not args.no_compile)
        print("\n" + format_kernel_table(result))
        print(f"\nsaved {plot_kernels(result, args.out)}")
    options = dict(vocab_size=256, d_model=256, n_heads=4, n_loops=8, injection="add", init_state="zeros")
    kinds = ("torch",) if args.device == "cpu" else ("torch", "triton")
    for kernels in kinds:                                     # on a CPU the interpreter would time numpy
        torch.manual_seed(0)
        model = LoopLM(LoopLMConfig(**options, kernels=kernels)).to(args.device).eval()
        print("\n" + format_exit_update_table(bench_exit_update(model, repeats=args.repeats)))
    return 1 if failed else 0


BENCHMARKS["kernels"] = ("Triton kernels: timings against eager, compile and Liger on a GPU; checks on a CPU",
                         _kernels_arguments, _kernels_command)

# --- book/04a_appendix_engineering.py:2799 (cell 103) ---
if __name__ == "__main__" and "get_ipython" not in globals() and globals().get("__spec__") is not None:
    # `python -m looplm.bench`. The export places this cell last in looplm/bench.py, after the
    # benchmarks later chapters register.
    sys.exit(main())
