# Generated from book/04_backprop_through_the_loop.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['MinimalLoopedLM', 'minimal_from_looplm', 'bench_train', 'format_train_table', 'plot_train', 'BENCHMARKS', 'main']
# fmt: on

# --- book/04_backprop_through_the_loop.py, cell 150 ---
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from looplm.backprop import make_loop_loss
from looplm.model import LoopLM, LoopLMConfig
from looplm.train import default_loss


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

# --- book/04_backprop_through_the_loop.py, cell 152 ---
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

# --- book/04_backprop_through_the_loop.py, cell 154 ---
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

# --- book/04_backprop_through_the_loop.py, cell 156 ---
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

# --- book/04_backprop_through_the_loop.py, cell 158 ---
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


def _train_command(args):
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
    return BENCHMARKS[args.benchmark][2](args)

# --- book/04_backprop_through_the_loop.py, cell 159 ---
if __name__ == "__main__" and "get_ipython" not in globals() and globals().get("__spec__") is not None:
    # `python -m looplm.bench`. The export places this cell last in looplm/bench.py, after the
    # benchmarks later chapters register.
    sys.exit(main())
