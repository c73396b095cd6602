# Generated from book/04a_appendix_engineering.py, book/07_inference.py, book/09_mixture_of_experts.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['MinimalLoopedLM', 'minimal_from_looplm', 'bench_train', 'format_train_table', 'plot_train', 'BENCHMARKS', 'main', 'DECODE_SETTINGS', 'decode_quality', 'bench_decode', 'format_decode_table', 'plot_decode', 'bench_moe', 'format_moe_table', 'plot_moe']
# fmt: on

import argparse
import math
import statistics
import statistics as _statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from looplm.backprop import make_loop_loss
from looplm.checkpoints import load_model_flag
from looplm.checks import require_int
from looplm.data import TASKS, TASK_VOCAB, decode_answer, make_splits, make_task
from looplm.exits import make_exit_rule
from looplm.generate import generate
from looplm.model import LoopLM, LoopLMConfig
from looplm.moe import MoEFeedForward
from looplm.train import TrainConfig, default_loss, task_batches, train_two_stage

# --- book/04a_appendix_engineering.py:2368 (cell 91) ---
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

# --- book/04a_appendix_engineering.py:2443 (cell 93) ---
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

# --- book/04a_appendix_engineering.py:2473 (cell 95) ---
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

# --- book/04a_appendix_engineering.py:2544 (cell 97) ---
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

# --- book/04a_appendix_engineering.py:2586 (cell 99) ---
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

# --- book/04a_appendix_engineering.py:2654 (cell 100) ---
if __name__ == "__main__" and "get_ipython" not in globals() and globals().get("__spec__") is not None:
    # `python -m looplm.bench`. The export places this cell last in looplm/bench.py, after the
    # benchmarks later chapters register.
    sys.exit(main())
