# Generated from book/07_inference.py: edit the chapter, then run `make export`.
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
    decode_quality,
    bench_decode,
    format_decode_table,
    plot_decode,
)
from looplm.experiments import (  # noqa: F401
    CH07_SPLITS,
    CACHE_STRATEGIES_EXPERIMENT,
)

# --- book/07_inference.py, cell 30 ---
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

# --- book/07_inference.py, cell 32 ---
from looplm.adaptive import ExitRule


class ShiftedLoopLM(LoopLM):
    """A LoopLM whose encode, step and readout each do something its parent does not."""

    def encode(self, idx, cos, sin, attend=None):
        return 1.5 * super().encode(idx, cos, sin, attend)

    def step(self, h, x0, cos, sin, attend=None):
        return 0.8 * super().step(h, x0, cos, sin, attend) + 0.05

    def readout(self, h, cos, sin, attend=None, last_only=False):
        logits, z = super().readout(h, cos, sin, attend, last_only)
        return 3.0 * logits, z


def test_decoding_runs_the_models_own_step():
    for options in LAYOUTS:
        torch.manual_seed(0)
        model = ShiftedLoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_loops=3, max_seq_len=40,
                                           **options))
        tokens, logits = recompute_greedy(model, [1, 5, 7, 3, 9], 8)
        res = generate(model, [[1, 5, 7, 3, 9]], 8)
        assert torch.equal(res.new_tokens[0], tokens), options
        torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)


def test_explicit_n_loops_equals_recompute():
    model = small_model(**LAYOUTS[1])
    for k in (1, 2, 5):
        tokens, logits = recompute_greedy(model, [1, 5, 7, 3, 9], 6, n_loops=k)
        res = generate(model, [[1, 5, 7, 3, 9]], 6, n_loops=k)
        assert torch.equal(res.new_tokens[0], tokens) and (res.steps == k).all(), k
        torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)


class DtypeProbe(ExitRule):
    """A rule that never fires and records the dtypes of the logits and gates it is shown."""

    name, needs, stop_above = "probe", ("logits", "gates"), True

    def __init__(self):
        super().__init__(2.0)
        self.seen = set()

    def score(self, view):
        self.seen |= {view.logits.dtype, view.gates.dtype}
        return torch.zeros(view.token_shape)


def test_a_float64_model_decodes_in_float64():
    for options in LAYOUTS:
        model = small_model(**options).double()
        tokens, logits = recompute_greedy(model, [1, 5, 7, 3, 9], 8)
        res = generate(model, [[1, 5, 7, 3, 9]], 8)
        assert res.logits.dtype == logits.dtype == torch.float64
        assert torch.equal(res.new_tokens[0], tokens), options
        torch.testing.assert_close(res.logits[0], logits, atol=1e-12, rtol=0)
    probe = DtypeProbe()                                     # what an exit rule sees: float64 too
    generate(small_model(**LAYOUTS[2]).double(), [[1, 5, 7, 3, 9]], 4, exit_rule=probe)
    assert probe.seen == {torch.float64}, probe.seen


def test_the_generator_drives_every_random_draw():
    model = small_model(injection="add", init_state="random")
    prompts = [[1, 5, 7, 3, 9], [2, 2]]
    for temperature in (0.0, 1.0):
        before = torch.get_rng_state()
        runs = [generate(model, prompts, 6, temperature=temperature, generator=torch.Generator().manual_seed(seed))
                for seed in (7, 7, 8)]
        assert torch.equal(torch.get_rng_state(), before), "the global generator was used"
        assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].logits, runs[1].logits)
        assert not torch.equal(runs[0].logits, runs[2].logits)             # the draws do matter


def test_a_tiny_temperature_is_greedy():
    model = small_model(**LAYOUTS[1])
    prompts = [[1, 5, 7, 3, 9], [2, 2]]
    greedy = generate(model, prompts, 6)
    for temperature in (1e-300, 5e-324):
        res = generate(model, prompts, 6, temperature=temperature, top_k=3, generator=torch.Generator().manual_seed(0))
        assert torch.equal(res.tokens, greedy.tokens), temperature
    logits = torch.tensor([[1e30, -1e30, 0.0], [0.0, 0.5, 0.25]])
    assert choose_tokens(logits, 1e-300).tolist() == [0, 1]


def test_a_stop_token_ends_its_row():
    model = small_model(**LAYOUTS[1])
    prompts, pad = [[1, 5, 7, 3, 9], [2, 2]], 22
    free = generate(model, prompts, 8, pad_id=pad)
    row0, row1 = free.new_tokens.tolist()
    col = next(c for c in range(1, 8) if row0[c] not in row0[:c])      # the first new token not seen before
    stop = row0[col]
    res = generate(model, prompts, 8, stop_tokens=[stop], pad_id=pad)
    assert res.new_tokens[0, :col + 1].tolist() == row0[:col + 1]
    assert (res.new_tokens[0, col + 1:] == pad).all() and (res.steps[0, col + 1:] == 0).all()
    assert (res.steps[0, :col + 1] == 3).all() and (res.logits[0, col + 1:] == 0).all()
    assert res.sequences()[0] == prompts[0] + row0[:col + 1] and res.sequences()[0][-1] == stop
    end = row1.index(stop) + 1 if stop in row1 else 8                   # the other row goes on to its own stop
    assert res.new_tokens[1, :end].tolist() == row1[:end] and (res.steps[1, end:] == 0).all()
    assert res.sequences()[1] == prompts[1] + row1[:end]

# --- book/07_inference.py, cell 34 ---
def test_strategy_identities_and_bytes():
    model = small_model(**LAYOUTS[1])                       # 1 prelude, 2 core, 1 coda block, S = 3
    prompt = [[1, 5, 7, 3, 9]]
    exact = generate(model, prompt, 8)
    same = {"mod-3": "exact", "mod-5": "exact", "mod-1": "last"}
    for name, twin in same.items():
        a, b = generate(model, prompt, 8, cache=name), generate(model, prompt, 8, cache=twin)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits), name
        torch.testing.assert_close(a.logits[0, 1:], b.logits[0, 1:], atol=1e-5, rtol=0)   # every decoded token
    c = model.config
    position = 2 * c.d_model * 4                            # k and v of one position in one block, float32
    for name, slots in (("exact", 3), ("last", 1), ("first", 1), ("average", 1), ("mod-2", 2)):
        res = generate(model, prompt, 8, cache=name)
        torch.testing.assert_close(res.logits[:, 0], exact.logits[:, 0])     # the first token: from the prefill
        if name != "exact":                                  # the later tokens read shared entries
            assert (res.logits[0, 1:] - exact.logits[0, 1:]).abs().max() > 1e-4, name
        expected = position * (1 * (5 + 7) + (2 + 1) * (3 * 5 + slots * 7))
        assert res.cache_bytes == expected, name

# --- book/07_inference.py, cell 36 ---
def reference_shared_decode(model, prompt, n_new, strategy):
    """Greedy decoding under a cache strategy, without a cache: one position at a time, with every
    position's (k, v) of every block and step kept as computed when it was the newest position."""
    S = model.config.n_loops

    def read(entries, t):                 # entries: [(k, v) of step 1, ..., of step S] of one position
        if strategy == "average":
            return tuple(torch.stack(x).mean(0) for x in zip(*entries))
        if strategy.startswith("mod-"):
            K = int(strategy[4:])
            return entries[max(u for u in range(1, S + 1) if (u - 1) % K == (t - 1) % K) - 1]
        return entries[{"exact": t, "last": S, "first": 1}[strategy] - 1]

    store, seq, all_logits = {}, list(prompt), []

    def attend_for(part, t, pos):
        def for_block(i):
            def attend(q, k, v):                                   # (1, nh, 1, hs) each
                history = store.setdefault((part, i), [])
                if len(history) == pos:
                    history.append([])
                history[pos].append((k, v))                        # index t - 1: this position's step t
                if part == "prelude":
                    earlier = [history[j][0] for j in range(pos)]
                else:
                    earlier = [history[j][t - 1] if j < len(prompt) else read(history[j], t) for j in range(pos)]
                keys = torch.cat([e[0] for e in earlier] + [k], dim=2)
                values = torch.cat([e[1] for e in earlier] + [v], dim=2)
                return torch.nn.functional.scaled_dot_product_attention(q, keys, values)
            return attend
        return for_block

    with torch.no_grad():
        for pos in range(len(prompt) + n_new - 1):
            cos, sin = model.rope.cos[pos:pos + 1], model.rope.sin[pos:pos + 1]
            x0 = model.encode(torch.tensor([[seq[pos]]]), cos, sin, attend=attend_for("prelude", 1, pos))
            h = model.init_state(x0)
            for t in range(1, S + 1):
                h = model.step(h, x0, cos, sin, attend=attend_for("core", t, pos))
                logits, _ = model.readout(h, cos, sin, attend=attend_for("coda", t, pos))
            if pos >= len(prompt) - 1:                             # the last step's readout picks the next token
                all_logits.append(logits[0, -1])
                seq.append(logits[0, -1].argmax().item())
    return torch.tensor(seq[len(prompt):]), torch.stack(all_logits)


def test_every_strategy_equals_a_reference_without_a_cache():
    model = small_model(n_loops=4, **LAYOUTS[1])            # 1 prelude, 2 core, 1 coda block, S = 4
    for strategy in ("exact", "last", "first", "average", "mod-2", "mod-3"):
        tokens, logits = reference_shared_decode(model, [1, 5, 7, 3, 9], 7, strategy)
        res = generate(model, [[1, 5, 7, 3, 9]], 7, cache=strategy)
        assert torch.equal(res.new_tokens[0], tokens), strategy
        torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)

# --- book/07_inference.py, cell 38 ---
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

# --- book/07_inference.py, cell 39 ---
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

# --- book/07_inference.py, cell 42 ---
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

# --- book/07_inference.py, cell 43 ---
import io


class _Hostile:
    """Unpickling this object would call io.open(marker, "w"): a stand-in for a pickle that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return io.open, (self.marker, "w")


def test_unusable_checkpoints_say_why():
    model = small_model()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        payload = torch.load(save_model(folder / "model.pt", model), weights_only=True)
        wide = LoopLM(LoopLMConfig(vocab_size=23, d_model=64, n_heads=4, n_loops=3, max_seq_len=40))
        torch.save({**payload, "trainer": {"model": wide.state_dict()}}, folder / "wide.pt")
        with pytest.raises(CheckpointError) as info:
            load_model(folder / "wide.pt")
        message, n_tensors = str(info.value), len(model.state_dict())
        assert f"{n_tensors} tensor(s) differ in shape: embed.weight is [23, 64] in the file and [23, 32] in the model; " in message
        assert message.endswith(f"; and {n_tensors - 3} more"), message             # whole, not cut off
        fewer = {k: v for k, v in model.state_dict().items() if k != "norm.weight"}
        torch.save({**payload, "trainer": {"model": fewer}}, folder / "fewer.pt")
        with pytest.raises(CheckpointError, match="1 tensor\\(s\\) of the model are missing: norm.weight$"):
            load_model(folder / "fewer.pt")
        marker = folder / "marker"
        torch.save({**payload, "extra": _Hostile(marker)}, folder / "hostile.pt")
        with pytest.raises(CheckpointError, match=r"reference to the Python object io.open, which unpickling would "
                                                  r"call .* so it was not loaded"):
            load_model(folder / "hostile.pt")
        assert not marker.exists()                                   # nothing ran
        (folder / "junk.pt").write_bytes(b"garbage" * 10)
        with pytest.raises(CheckpointError, match="not a readable looplm checkpoint: the file is damaged"):
            load_model(folder / "junk.pt")

# --- book/07_inference.py, cell 69 ---
import contextlib
import io
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
        from looplm.generate import main               # the rest in this process: the same main()

        for bad, message in ((["--prompt", "K1=", "--cache", "middle"], "unknown cache strategy"),
                             (["--prompt", "hello"], "is not in the vocabulary"),
                             (["--prompt", "K1=", "--max-new-tokens", "-2"], "--max-new-tokens")):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    status = main(base[3:-2] + bad)
                except SystemExit as stop:                 # argparse's own errors
                    status = stop.code
            assert status == 2 and message in err.getvalue(), err.getvalue()
        assert os.listdir(folder) == ["m.pt"]

# --- book/07_inference.py, cell 71 ---
import contextlib
import io
import math

from looplm.model import _physical_memory_bytes


def test_silent_results_become_errors():
    model = small_model()
    good = [[1, 2, 3]]
    for change, error, message in [
        (dict(pad_id=True), ValueError, "pad_id must be an int token id"),
        (dict(top_k=True, temperature=1.0), ValueError, "top_k must be an int"),
        (dict(n_loops=True), ValueError, "n_loops must be an int"),
        (dict(stop_tokens=[True]), ValueError, "stop_tokens must be token ids"),
        (dict(stop_tokens=5), TypeError, r"stop_tokens must be None or a list, tuple or set of token ids \(e.g. \[5\]"),
        (dict(stop_tokens="5"), TypeError, "stop_tokens must be None or a list"),
        (dict(generator=0), TypeError, "generator must be a torch.Generator"),
        (dict(record=1), ValueError, "record must be True or False"),
    ]:
        with pytest.raises(error, match=message):
            generate(model, good, 4, **change)
    with pytest.raises(ValueError, match="max_new_tokens must be an int"):
        generate(model, good, True)
    assert generate(model, good, 4, stop_tokens=(5,)).tokens.shape == generate(model, good, 4, stop_tokens={5}).tokens.shape
    with torch.no_grad():
        model.core[0].mlp.up.weight[3, 1] = float("inf")
    with pytest.raises(ValueError, match="parameter core.0.mlp.up.weight holds non-finite values"):
        generate(model, good, 4)
    if _physical_memory_bytes() is not None:
        with pytest.raises(ValueError, match="the KV cache for n_loops=1000000000000, 1 prompt"):
            generate(small_model(), good, 4, n_loops=10**12)


def _cli(argv):
    """main(argv) in this process -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:                                      # argparse's own errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_command_line_flags():
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, max_seq_len=22))
        path = str(save_model(Path(folder) / "m.pt", model))
        base = ["--checkpoint", path, "--prompt", "K12-3="]
        code, out, err = _cli(base + ["--n-loops", "1", "--max-new-tokens", "3"])
        assert code == 0 and out.startswith("K12-3= -> ") and "steps per token [1, 1, 1]" in out, err
        greedy = _cli(base + ["--max-new-tokens", "4"])
        assert greedy[0] == 0 and _cli(base + ["--max-new-tokens", "4", "--temperature", "1e-300"]) == greedy
        cases = [
            (["--exit-rule", "fixed", "--exit-threshold", "nan"], "--exit-threshold must be a finite number, got nan"),
            (["--exit-rule", "fixed", "--exit-threshold", "inf"], "--exit-threshold must be a finite number, got inf"),
            (["--exit-rule", "fixed", "--exit-threshold", "1.5"], "--exit-threshold is the number of steps"),
            (["--exit-rule", "confidence", "--exit-threshold", "nan"], "--exit-threshold must be a finite number"),
            (["--exit-rule", "confidence", "--exit-threshold", "2"], "--exit-threshold 2.0 does not suit"),
            (["--exit-threshold", "0.5"], "--exit-threshold 0.5 has no rule to set"),
            (["--exit-rule", "kl", "--min-steps", "0"], "--min-steps must be an int >= 1"),
            (["--exit-rule", "q_exit"], "--exit-rule q_exit reads the exit gate"),
            (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
            (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
            (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
            (["--top-k", "0", "--temperature", "1"], "--top-k must be an int >= 1"),
            (["--top-k", "3"], "--top-k 3 has no effect on greedy decoding"),
            (["--max-new-tokens", "100"], "--max-new-tokens 100 is too many: the longest prompt has 6 tokens, and "
                                          "6 + 100 - 1 = 105 positions (every new token but the last is fed back) "
                                          "do not fit the model's context (max_seq_len=22); use --max-new-tokens 17 "
                                          "or less"),
            (["--prompt", "K" * 30], "--prompt: the longest prompt has 30 tokens"),
            (["--prompt", ""], "--prompt '' is empty"),
            (["--prompt", "hello"], "--prompt 'hello': character 'h'"),
            (["--n-loops", "0"], "--n-loops must be an int >= 1"),
            (["--n-loops", "two"], "argument --n-loops: invalid int value: 'two'"),
            (["--cache", "mod-0"], "--cache: unknown cache strategy 'mod-0'"),
            (["--seed", "-1"], "--seed must be an int in [0, 2**64)"),
        ]
        if _physical_memory_bytes() is not None:
            cases.append((["--n-loops", str(10**12)], "--n-loops 1000000000000 with --max-new-tokens 17: the KV cache"))
        for flags, message in cases:
            code, out, err = _cli(base + flags)
            assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, (flags, err)
            assert message in err, (flags, err)
        for checkpoint, message in ((Path(folder) / "missing.pt", "--checkpoint: no checkpoint at"),
                                    (Path(folder), "--checkpoint: no checkpoint at")):
            code, _, err = _cli(["--checkpoint", str(checkpoint), "--prompt", "K1="])
            assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_bench_decode_checks_its_flags():
    import argparse

    from looplm.bench import BENCHMARKS

    _, add_arguments, run = BENCHMARKS["decode"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "junk.pt").write_bytes(b"garbage" * 10)
        marker = folder / "marker"
        torch.save({"format": "looplm-checkpoint", "extra": _Hostile(marker)}, folder / "hostile.pt")
        small = save_model(folder / "small.pt", LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, max_seq_len=8)))
        cases = [(["--task", "chess"], ValueError, "--task must be one of addition, parentheses, sorting, stack"),
                 (["--checkpoint", str(folder / "missing.pt")], FileNotFoundError, "--checkpoint: no checkpoint at"),
                 (["--checkpoint", str(folder / "junk.pt")], CheckpointError, "--checkpoint: .* the file is damaged"),
                 (["--checkpoint", str(folder / "hostile.pt")], CheckpointError, "--checkpoint: .* so it was not loaded"),
                 (["--checkpoint", str(small)], ValueError, "--difficulty 4: decoding the stack examples .* "
                                                            "max_seq_len=8; use a smaller --difficulty")]
        for flag in ("--n-test", "--repeats", "--batch-size", "--train-steps", "--difficulty", "--speed-examples"):
            cases.append(([flag, "0"], ValueError, f"{flag} must be an int >= 1, got 0"))
        for flags, error, message in cases:
            with pytest.raises(error, match=message):
                run(parser.parse_args(flags))
        assert not marker.exists()


class EndsAtOnce(LoopLM):
    """A LoopLM that always predicts the end token, so no answer has a second token."""

    def readout(self, h, cos, sin, attend=None, last_only=False):
        logits, z = super().readout(h, cos, sin, attend, last_only)
        return logits + 100.0 * torch.nn.functional.one_hot(torch.tensor(1), logits.shape[-1]), z


def test_bench_decode_without_decoded_tokens():
    from looplm.bench import bench_decode, format_decode_table
    from looplm.data import TASK_VOCAB, make_splits

    assert TASK_VOCAB.eos_id == 1
    model = EndsAtOnce(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, exit_gate=True, max_seq_len=16))
    examples = make_splits("stack", n_train=50, n_test=4, max_difficulty=2, ood_max_difficulty=3).test
    result = bench_decode(model, examples, settings=(("exact", None), ("exact", "q_exit")), batch_size=2,
                          speed_examples=1, repeats=1)
    assert all(math.isnan(r["tok_s_1"]) and math.isnan(r["speedup_2"]) for r in result["rows"])
    assert "nan: no token was decoded after the first one" in format_decode_table(result)
