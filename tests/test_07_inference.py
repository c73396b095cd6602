# Generated from book/07_inference.py: edit the chapter, then run `make export`.

import pytest
import torch

from looplm.bench import (  # noqa: F401
    DECODE_SETTINGS,
    decode_quality,
    bench_decode,
    format_decode_table,
    plot_decode,
)
from looplm.exits import ExitRule, exit_steps, make_exit_rule, select_exit_logits
from looplm.experiments import (  # noqa: F401
    CH07_SPLITS,
    CACHE_STRATEGIES_EXPERIMENT,
)
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
from looplm.model import LoopLM, LoopLMConfig
from looplm.testing import (  # noqa: F401
    LAYOUTS,
    small_model,
    recompute_greedy,
)

# --- book/07_inference.py:972 (cell 36) ---
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine makes two threads much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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

# --- book/07_inference.py:1038 (cell 39) ---
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

# --- book/07_inference.py:1072 (cell 41) ---
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

# --- book/07_inference.py:1153 (cell 43) ---
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

# --- book/07_inference.py:1228 (cell 44) ---
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
