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

# --- book/07_inference.py, cell 35 ---
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

# --- book/07_inference.py, cell 37 ---
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

# --- book/07_inference.py, cell 39 ---
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

# --- book/07_inference.py, cell 41 ---
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

# --- book/07_inference.py, cell 43 ---
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

# --- book/07_inference.py, cell 44 ---
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
