# Generated from book/06_inference.py: edit the chapter, then run `make export`.
from looplm.generate import (  # noqa: F401
    CacheStrategy,
    CACHE_STRATEGIES,
    cache_strategy,
    LayerCache,
    LoopKVCache,
    GenerationResult,
    choose_tokens,
    generate,
    save_model,
    load_model,
    RULE_DEFAULTS,
    main,
)
from looplm.bench import (  # noqa: F401
    DECODE_SETTINGS,
    bench_decode,
    format_decode_table,
    plot_decode,
)

# --- book/06_inference.py, cell 30 ---
import pytest
import torch

from looplm.adaptive import make_exit_rule
from looplm.model import LoopLM, LoopLMConfig

LAYOUTS = [
    dict(),
    dict(n_prelude=1, n_core=2, n_coda=1, injection="add", norm_style="sandwich"),
    dict(n_coda=1, injection="concat", init_state="zeros", norm_style="huginn", exit_gate=True),
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine makes two threads much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_model(seed=0, n_loops=3, **options):
    torch.manual_seed(seed)
    return LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_loops=n_loops, max_seq_len=40, **options))


def recompute_greedy(model, prompt, n_new, n_loops=None):
    """The slow reference: the full forward at every position, last step, argmax."""
    seq, logits = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n_new):
            last = model(seq, n_loops=n_loops).logits[-1, 0, -1]               # (V,)
            logits.append(last)
            seq = torch.cat([seq, last.argmax().view(1, 1)], dim=1)
    return seq[0, len(prompt):], torch.stack(logits)


def test_exact_cache_equals_full_recompute():
    for options in LAYOUTS:
        model = small_model(**options)
        tokens, logits = recompute_greedy(model, [1, 5, 7, 3, 9], 10)
        res = generate(model, [[1, 5, 7, 3, 9]], 10)
        assert torch.equal(res.new_tokens[0], tokens), options
        torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)
        assert (res.steps == model.config.n_loops).all()


def test_batched_equals_alone():
    prompts = [[1, 5, 7, 3, 9], [2, 2], [4, 6, 8, 10, 12, 14, 3], [7]]
    for options in LAYOUTS:
        model = small_model(**options)
        batch = generate(model, prompts, 6)
        assert batch.tokens.shape == (4, 7 + 6) and batch.prompt_lengths.tolist() == [5, 2, 7, 1]
        for row, prompt in enumerate(prompts):
            alone = generate(model, [prompt], 6)
            assert torch.equal(alone.new_tokens[0], batch.new_tokens[row]), (options, row)
            torch.testing.assert_close(batch.logits[row], alone.logits[0], atol=1e-5, rtol=0)
            assert batch.sequences()[row] == alone.sequences()[0]


def test_cache_length_equals_tokens_seen():
    model = small_model(**LAYOUTS[1])
    for cache in ("exact", "last", "mod-2"):
        res = generate(model, [[1, 5, 7], [3, 4, 5, 6, 8]], 7, cache=cache, record=True)
        assert res.cache.length == 5 + 6                           # prompt columns + fed-back tokens
        log = res.cache.log
        assert len(log) == 6 * (1 + 3 * (2 + 1))                   # per token: prelude + S x (core + coda)
        assert all(keys == seen for *_, keys, seen in log)

# --- book/06_inference.py, cell 32 ---
def test_strategy_identities_and_bytes():
    model = small_model(**LAYOUTS[1])                       # 1 prelude, 2 core, 1 coda block, S = 3
    prompt = [[1, 5, 7, 3, 9]]
    exact = generate(model, prompt, 8)
    same = {"mod-3": "exact", "mod-5": "exact", "mod-1": "last"}
    for name, twin in same.items():
        a, b = generate(model, prompt, 8, cache=name), generate(model, prompt, 8, cache=twin)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits), name
    c = model.config
    position = 2 * c.d_model * 4                            # k and v of one position in one block, float32
    for name, slots in (("exact", 3), ("last", 1), ("first", 1), ("average", 1), ("mod-2", 2)):
        res = generate(model, prompt, 8, cache=name)
        torch.testing.assert_close(res.logits[:, 0], exact.logits[:, 0])
        expected = position * (1 * (5 + 7) + (2 + 1) * (3 * 5 + slots * 7))
        assert res.cache_bytes == expected, name

# --- book/06_inference.py, cell 34 ---
from looplm.adaptive import ExitRule, exit_steps, select_exit_logits


def _reference_attention(block, u, cos, sin, saved, key, exit_at, t):
    q, k, v = block.attn.project_qkv(u, cos, sin)                           # (1, nh, T, hs)
    for j, e in enumerate(exit_at):
        if e < t:                                                           # exited: its step-e entry
            k[:, :, j], v[:, :, j] = saved[key + (e,)][0][:, :, j], saved[key + (e,)][1][:, :, j]
    saved[key + (t,)] = (k, v)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return block.attn.project_out(y)


def _reference_block(block, x, cos, sin, saved, key, exit_at, t):
    """Block.forward with the exited positions' keys and values replaced."""
    attention = lambda u: _reference_attention(block, u, cos, sin, saved, key, exit_at, t)
    if block.norm_style == "pre":
        n1, n2 = block.norms
        x = x + attention(n1(x))
        return x + block.mlp(n2(x))
    n1, n2, n3, n4 = block.norms
    if block.norm_style == "sandwich":
        x = x + n2(attention(n1(x)))
        return x + n4(block.mlp(n3(x)))
    x = n2(x + attention(n1(x)))
    return n4(x + block.mlp(n3(x)))


def reference_early_exit(model, prompt, n_new, rule):
    """Greedy decoding with per-token exits and the deepest-state fill, recomputed from scratch."""
    S = model.config.n_loops
    seq, exit_at, all_logits, all_steps = list(prompt), [S] * len(prompt), [], []
    with torch.no_grad():
        for _ in range(n_new):
            idx = torch.tensor([seq])
            cos, sin = model.rope(len(seq))
            x0 = model.encode(idx, cos, sin)
            h, saved, logits, gates, hidden = model.init_state(x0), {}, [], [], []
            for t in range(1, S + 1):
                u = model.injection(h, x0)
                for l, block in enumerate(model.core):
                    u = _reference_block(block, u, cos, sin, saved, ("core", l), exit_at, t)
                h = u
                z = h
                for j, block in enumerate(model.coda):
                    z = _reference_block(block, z, cos, sin, saved, ("coda", j), exit_at, t)
                z = model.norm(z)
                logits.append(model.lm_head(z)[0, -1])
                hidden.append(h[0, -1])
                if model.exit_gate is not None:
                    gates.append(model.exit_gate(z)[0, -1])
            logits, hidden = torch.stack(logits), torch.stack(hidden)                 # (S, V), (S, D)
            gate = torch.stack(gates) if gates else None
            step = exit_steps(rule, logits=logits[:, None], gate=None if gate is None else gate[:, None],
                              hidden=hidden[:, None])                                 # (1,)
            chosen = select_exit_logits(logits[:, None], step)[0]
            if len(seq) > len(prompt):
                exit_at[-1] = step.item()      # the fed-back token's exit; the prompt's last stays S
            all_logits.append(chosen)
            all_steps.append(step.item())
            seq.append(chosen.argmax().item())
            exit_at.append(S)
    return torch.tensor(seq[len(prompt):]), torch.stack(all_logits), torch.tensor(all_steps)


class ParityExit(ExitRule):
    """A test rule that fires often and irregularly: stop when the top token's id is even."""

    name, needs, stop_above = "parity", ("logits",), True

    def score(self, view):
        return (view.logits.argmax(-1) % 2 == 0).float()

# --- book/06_inference.py, cell 35 ---
def test_a_rule_that_never_fires_is_full_depth():
    for options in LAYOUTS:
        model = small_model(n_loops=4, **options)
        full = generate(model, [[1, 5, 7], [3, 9]], 8)
        for rule in (make_exit_rule("fixed", 4), make_exit_rule("confidence", 1.0)):
            res = generate(model, [[1, 5, 7], [3, 9]], 8, exit_rule=rule)
            assert torch.equal(res.tokens, full.tokens) and torch.equal(res.logits, full.logits)
            assert (res.steps == 4).all()


def test_each_token_is_the_readout_of_its_exit_step():
    for options in LAYOUTS:
        model = small_model(n_loops=4, **options)
        rules = [ParityExit(0.5), ParityExit(0.5, min_steps=2), make_exit_rule("kl", 2e-3),
                 make_exit_rule("hidden_change", 0.3)]
        if model.exit_gate is not None:
            rules.append(make_exit_rule("q_exit", 0.6))
        used = set()
        for rule in rules:
            tokens, logits, steps = reference_early_exit(model, [1, 5, 7, 3, 9], 10, rule)
            res = generate(model, [[1, 5, 7, 3, 9]], 10, exit_rule=rule)
            assert torch.equal(res.steps[0], steps), (options, rule)
            assert torch.equal(res.new_tokens[0], tokens), (options, rule)
            torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)
            used |= set(steps.tolist())
        assert len(used) >= 2 and min(used) < 4, used       # the exits really happen, and vary


def test_fixed_depth_equals_a_shallower_model():
    for options in LAYOUTS[:2]:
        model = small_model(n_loops=4, **options)
        tokens, logits = recompute_greedy(model, [1, 5, 7, 3, 9], 8, n_loops=2)
        res = generate(model, [[1, 5, 7, 3, 9]], 8, exit_rule=make_exit_rule("fixed", 2))
        assert torch.equal(res.new_tokens[0], tokens) and (res.steps == 2).all()
        torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)


def test_batched_early_exit_equals_alone():
    prompts = [[1, 5, 7, 3, 9], [2, 2], [4, 6, 8, 10, 12, 14, 3], [7]]
    for options in LAYOUTS:
        model = small_model(n_loops=4, **options)
        for cache in ("exact", "mod-2", "average"):
            batch = generate(model, prompts, 6, exit_rule=ParityExit(0.5), cache=cache, stop_tokens=[3])
            for row, prompt in enumerate(prompts):
                alone = generate(model, [prompt], 6, exit_rule=ParityExit(0.5), cache=cache, stop_tokens=[3])
                assert torch.equal(alone.steps[0], batch.steps[row]), (options, cache, row)
                assert batch.sequences()[row] == alone.sequences()[0]
                torch.testing.assert_close(batch.logits[row], alone.logits[0], atol=1e-5, rtol=0)


def test_fill_rule_copies_the_exit_step():
    model = small_model(n_loops=4, **LAYOUTS[1])
    res = generate(model, [[1, 5, 7, 3, 9]], 9, exit_rule=ParityExit(0.5))
    cache, steps = res.cache, res.steps[0, 1:]               # steps of the fed-back tokens
    assert (steps < 4).any()
    for (group, _), layer in cache.layers.items():
        if group == "prelude":
            continue
        for n, e in enumerate(steps.tolist()):
            for t in range(e + 1, 5):                         # every deeper entry is the step-e entry
                assert torch.equal(layer.new_k[t - 1, 0, :, n], layer.new_k[e - 1, 0, :, n])
                assert torch.equal(layer.new_v[t - 1, 0, :, n], layer.new_v[e - 1, 0, :, n])

# --- book/06_inference.py, cell 38 ---
import os
import tempfile
from pathlib import Path

from looplm.train import CheckpointError


def test_saved_model_loads_with_identical_logits():
    model = small_model(**LAYOUTS[2])
    idx = torch.tensor([[1, 5, 7, 3, 9, 2]])
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(Path(folder) / "model.pt", model)
        assert os.listdir(folder) == ["model.pt"]                   # no temporary file left
        loaded = load_model(path)
        assert loaded.config == model.config
        with torch.no_grad():
            assert torch.equal(loaded(idx).logits, model(idx).logits)
            assert torch.equal(loaded(idx).gate, model(idx).gate)
        assert torch.equal(generate(loaded, idx, 5).tokens, generate(model, idx, 5).tokens)


def test_bad_checkpoints_are_refused():
    model = small_model()
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(Path(folder) / "model.pt", model)
        other = small_model(n_loops=5)
        with pytest.raises(CheckpointError, match="n_loops: checkpoint 3, model 5"):
            load_model(path, model=other)
        payload = torch.load(path, weights_only=True)
        for version, message in (("99.0.0", "newer than the installed"), ("banana", "unknown looplm version")):
            torch.save({**payload, "looplm_version": version}, Path(folder) / "v.pt")
            with pytest.raises(CheckpointError, match=message):
                load_model(Path(folder) / "v.pt")
        (Path(folder) / "junk.pt").write_bytes(b"not a checkpoint")
        with pytest.raises(CheckpointError, match="not a readable looplm checkpoint"):
            load_model(Path(folder) / "junk.pt")
        with pytest.raises(FileNotFoundError):
            load_model(Path(folder) / "missing.pt")
        before = sorted(os.listdir(folder))
        bad = small_model()
        with torch.no_grad():
            bad.embed.weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            save_model(Path(folder) / "nan.pt", bad)
        assert sorted(os.listdir(folder)) == before                 # nothing written

# --- book/06_inference.py, cell 61 ---
import subprocess
import sys


def test_bad_input_gets_clear_errors():
    model = small_model()
    good = [[1, 2, 3]]
    cases = [
        (dict(idx=[[]]), ValueError, "prompt 0 is empty"),
        (dict(idx=[]), ValueError, "there are no prompts"),
        (dict(idx=[[1, 99]]), ValueError, r"ids outside \[0, vocab_size=23\)"),
        (dict(idx=[[-1, 2]]), ValueError, r"ids outside \[0, vocab_size=23\)"),
        (dict(idx=[list(range(1, 20)) * 2]), ValueError, "leaves room for at most"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 0"),
        (dict(cache="lastest"), ValueError, "unknown cache strategy 'lastest'"),
        (dict(cache="mod-0"), ValueError, "unknown cache strategy 'mod-0'"),
        (dict(exit_rule="q_exit"), ValueError, "needs a threshold"),
        (dict(exit_rule="sometimes"), ValueError, "unknown exit rule 'sometimes'"),
        (dict(exit_rule=make_exit_rule("q_exit", 0.5)), ValueError, "built without"),
        (dict(temperature=-1.0), ValueError, "temperature must be"),
        (dict(top_k=0), ValueError, "top_k must be an int >= 1"),
        (dict(stop_tokens=[23]), ValueError, "stop_tokens must be token ids"),
        (dict(idx=torch.tensor([[1.0, 2.0]])), TypeError, "integer tensor"),
    ]
    for change, error, message in cases:
        kwargs = {"idx": good, "max_new_tokens": 4, **change}
        with pytest.raises(error, match=message):
            generate(model, kwargs.pop("idx"), kwargs.pop("max_new_tokens"), **kwargs)
    assert generate(model, good, 0).tokens.tolist() == good        # zero new tokens is allowed


def test_command_line():
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(Path(folder) / "m.pt", LoopLM(LoopLMConfig(vocab_size=24, d_model=32, n_heads=4,
                                                                    exit_gate=True, max_seq_len=40)))
        base = [sys.executable, "-m", "looplm.generate", "--checkpoint", str(path), "--max-new-tokens", "3"]
        ok = subprocess.run(base + ["--prompt", "K12-3=", "--prompt", "A1+2=", "--exit-rule", "q_exit"],
                            capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.startswith("K12-3= -> ") and "steps per token" in ok.stdout
        for bad, message in ((["--prompt", "K1=", "--cache", "middle"], "unknown cache strategy"),
                             (["--prompt", "hello"], "is not in the vocabulary"),
                             (["--prompt", "K1=", "--max-new-tokens", "-2"], "max_new_tokens")):
            run = subprocess.run(base[:-2] + bad, capture_output=True, text=True, timeout=120)
            assert run.returncode == 2 and message in run.stderr, run.stderr
        assert os.listdir(folder) == ["m.pt"]
