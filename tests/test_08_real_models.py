# Generated from book/08_real_models.py: edit the chapter, then run `make export`.

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from looplm.block import (  # noqa: F401
    repeat_kv,
    GroupedQueryAttention,
)
from looplm.block import CausalSelfAttention, RotaryEmbedding, attention_reference
from looplm.convert import (  # noqa: F401
    pairs_to_halves,
    ConversionError,
    ouro_config,
    ouro_exit_rule,
    huginn_config,
    ouro_state_dict,
    huginn_state_dict,
    from_ouro,
    from_huginn,
    CONVERTERS,
    load_pretrained,
    write_pretrained,
)
from looplm.exits import FixedDepth, QExit, exit_steps
from looplm.experiments import (  # noqa: F401
    CH08_THRESHOLDS,
    exit_mode_quality,
    EXIT_MODES_EXPERIMENT,
)
from looplm.generate import generate
from looplm.model import LoopLM, LoopLMConfig, looplm_param_count
from looplm.testing import (  # noqa: F401
    ouro_reference,
    huginn_reference,
    TINY_OURO,
    TINY_HUGINN,
    random_ouro_state_dict,
    huginn_freqs_cis,
    random_huginn_state_dict,
)
from looplm.testing import recompute_greedy

# --- book/08_real_models.py:241 (cell 13) ---
def test_gqa_with_all_heads_is_chapter_1s_attention():
    torch.manual_seed(0)
    mha, gqa = CausalSelfAttention(32, 4), GroupedQueryAttention(32, 4, n_kv_heads=4)
    gqa.load_state_dict(mha.state_dict())                     # same keys, same shapes
    cos, sin = RotaryEmbedding(8, 16)(10)
    x = torch.randn(2, 10, 32)
    assert torch.equal(gqa(x, cos, sin), mha(x, cos, sin))


def test_gqa_equals_the_written_out_formula():
    torch.manual_seed(1)
    for n_kv in (1, 2, 4):
        attn = GroupedQueryAttention(32, 4, n_kv_heads=n_kv).double()
        cos, sin = RotaryEmbedding(8, 16).double()(9)
        x = torch.randn(2, 9, 32, dtype=torch.float64)
        q, k, v = attn.project_qkv(x, cos, sin)
        assert k.shape == v.shape == (2, n_kv, 9, 8)
        r = 4 // n_kv
        heads = [attention_reference(q[:, i:i + 1], k[:, i // r:i // r + 1], v[:, i // r:i // r + 1])
                 for i in range(4)]                           # query head i reads kv head i // r
        expected = attn.proj(torch.cat(heads, 1).transpose(1, 2).reshape(2, 9, 32))
        torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-12, rtol=0)


def test_gqa_models_count_their_parameters_and_decode_like_recomputing():
    for n_kv in (1, 2):
        torch.manual_seed(n_kv)
        cfg = LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_kv_heads=n_kv, n_prelude=1, n_coda=1,
                           n_loops=3, max_seq_len=40)
        model = LoopLM(cfg)
        assert sum(p.numel() for p in model.parameters()) == looplm_param_count(cfg)
        assert model.core[0].attn.qkv.weight.shape == (32 + 2 * 8 * n_kv, 32)
        res = generate(model, [[1, 5, 7, 3]], 6)
        tokens, logits = recompute_greedy(model, [1, 5, 7, 3], 6)
        assert torch.equal(res.new_tokens[0], tokens)
        torch.testing.assert_close(res.logits[0], logits, atol=1e-5, rtol=0)


def test_default_configs_keep_chapter_1s_attention():
    model = LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_kv_heads=4))
    assert type(model.core[0].attn) is CausalSelfAttention
    with pytest.raises(ValueError, match="n_kv_heads"):
        LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="qk_bias"):
        GroupedQueryAttention(32, 4, n_kv_heads=2, qk_bias=True)

# --- book/08_real_models.py:360 (cell 20) ---
def test_gqa_cache_bytes_match_the_formula():
    for n_kv, layout in ((1, dict(n_prelude=1, n_core=2, n_coda=1)), (2, dict(n_core=3))):
        torch.manual_seed(0)
        cfg = LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_kv_heads=n_kv, n_loops=3, max_seq_len=40, **layout)
        res = generate(LoopLM(cfg), [[1, 5, 7, 3, 9]], 8, cache="mod-2")
        P, C, K, S, Tp, N, slots = cfg.n_prelude, cfg.n_core, cfg.n_coda, 3, 5, 7, 2
        positions = P * (Tp + N) + (C + K) * (S * Tp + slots * N)
        assert res.cache_bytes == 2 * 1 * n_kv * cfg.head_dim * 4 * positions

# --- book/08_real_models.py:472 (cell 28) ---
def _tiny(**options):
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_loops=3, max_seq_len=40, **options))
    with torch.no_grad():                                      # gains that are not 1 catch a missing norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model.double()


def test_feedback_norm_feeds_the_normed_state_back():
    model = _tiny(feedback_norm=True, exit_gate=True)
    idx = torch.randint(0, 23, (2, 7))
    out = model(idx, return_hidden=True)
    cos, sin = model.rope(7)
    h = model.embed(idx)
    for t in range(3):
        for block in model.core:
            h = block(h, cos, sin)
        h = model.norm(h)                                      # inside the loop
        torch.testing.assert_close(out.hidden[t], h, atol=1e-12, rtol=0)
        torch.testing.assert_close(out.logits[t], model.lm_head(h), atol=1e-12, rtol=0)
        torch.testing.assert_close(out.gate[t], torch.sigmoid(model.exit_gate.proj(h))[..., 0], atol=1e-12, rtol=0)
    plain = _tiny(exit_gate=True)
    plain.load_state_dict(model.state_dict())
    other = plain(idx)
    torch.testing.assert_close(other.logits[0], out.logits[0], atol=1e-12, rtol=0)   # step 1: the same
    assert (other.logits[1] - out.logits[1]).abs().max() > 1e-3                       # then not
    with pytest.raises(ValueError, match="n_coda"):
        LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_coda=1, feedback_norm=True)


def test_norm_before_coda_and_embed_scale():
    model = _tiny(n_prelude=1, n_coda=1, injection="concat", init_state="random", norm_before_coda=True,
                  embed_scale=math.sqrt(32))
    idx = torch.randint(0, 23, (2, 6))
    h0 = torch.randn(2, 6, 32, dtype=torch.float64)
    out = model(idx, state0=h0)
    cos, sin = model.rope(6)
    x0 = model.prelude[0](model.embed(idx) * math.sqrt(32), cos, sin)
    h = h0
    for t in range(3):
        h = model.core[0](model.injection.adapter(torch.cat([h, x0], -1)), cos, sin)
        z = model.norm(model.coda[0](model.norm(h), cos, sin))           # one norm, used twice
        torch.testing.assert_close(out.logits[t], model.lm_head(z), atol=1e-12, rtol=0)


def test_random_start_has_its_std_and_state0_replaces_it():
    model = _tiny(injection="add", init_state="random", init_state_std=0.3)
    h0 = model.init_state(torch.zeros(64, 64, 32, dtype=torch.float64))
    truncated = 0.3 * 0.98658                                   # the ±3σ truncation shrinks the std
    assert abs(h0.std().item() - truncated) < 0.01 and h0.abs().max() <= 0.9
    idx = torch.randint(0, 23, (1, 5))
    start = torch.randn(1, 5, 32, dtype=torch.float64)
    assert torch.equal(model(idx, state0=start).logits, model(idx, state0=start).logits)
    assert not torch.equal(model(idx).logits, model(idx).logits)          # fresh draws without one


def test_weighted_logits_average_the_steps():
    model = _tiny(exit_gate=True)
    out = model(torch.randint(0, 23, (2, 5)))
    expected = sum(out.exit_probs[t][..., None] * out.logits[t] for t in range(3))
    torch.testing.assert_close(out.weighted_logits, expected, atol=1e-12, rtol=0)
    assert _tiny()(torch.randint(0, 23, (1, 3))).weighted_logits is None       # no gate: none

# --- book/08_real_models.py:1182 (cell 48) ---
OURO_GQA = {**TINY_OURO, "num_key_value_heads": 2}


def _ids(B=2, T=10, seed=0):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def _close(got, want, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    else:
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_ouro_per_step_logits_gates_and_exit_probabilities():
    for cfg in (TINY_OURO, OURO_GQA):
        for dtype in (torch.float64, torch.float32):
            sd = random_ouro_state_dict(cfg, seed=3, dtype=dtype)
            model, ids = from_ouro(sd, cfg), _ids()
            out, ref = model(ids, return_hidden=True), ouro_reference(sd, cfg, ids)
            assert model.config.n_loops == cfg["total_ut_steps"] and out.logits.dtype == dtype
            for t in range(cfg["total_ut_steps"]):
                _close(out.logits[t], ref["step_logits"][t], dtype)
                _close(out.hidden[t], ref["hidden"][t], dtype)
            _close(out.gate, ref["gates"], dtype)
            _close(out.exit_probs, ref["pdf"], dtype)
            _close(out.weighted_logits, ref["expected_logits"], dtype)


def test_ouro_threshold_and_fixed_exits_are_ouros():
    sd = random_ouro_state_dict(TINY_OURO, seed=4)
    model, ids = from_ouro(sd, TINY_OURO), _ids(B=3, T=12)
    out = model(ids)
    for q in (0.3, 0.5, 0.9, 1.0):
        ref = ouro_reference(sd, TINY_OURO, ids, exit_threshold=q)
        steps = exit_steps(QExit(q), gate=out.gate)                     # from 1
        assert torch.equal(steps - 1, ref["exit_steps"]), q
        picked = out.logits.gather(0, (steps - 1)[None, ..., None].expand(1, *ids.shape, 64))[0]
        torch.testing.assert_close(picked, ref["logits"], atol=1e-12, rtol=0)
    assert 0 < (ouro_reference(sd, TINY_OURO, ids, exit_threshold=0.5)["exit_steps"] < 2).float().mean() < 1
    for k in range(3):
        torch.testing.assert_close(out.logits[FixedDepth(k + 1).threshold - 1],
                                   ouro_reference(sd, TINY_OURO, ids, exit_at_step=k)["logits"], atol=1e-12, rtol=0)
    assert repr(ouro_exit_rule(TINY_OURO)) == repr(QExit(1.0))
    assert repr(ouro_exit_rule({**TINY_OURO, "early_exit_step": 1})) == repr(FixedDepth(2))
    assert ouro_exit_rule({**TINY_OURO, "early_exit_threshold": None}) is None


def test_huginn_per_step_logits_from_an_explicit_start():
    for dtype in (torch.float64, torch.float32):
        sd = random_huginn_state_dict(TINY_HUGINN, seed=5, dtype=dtype)
        model, ids = from_huginn(sd, TINY_HUGINN), _ids()
        h0 = torch.randn(2, 10, 32, dtype=dtype)
        out = model(ids, state0=h0)
        assert model.config.n_loops == TINY_HUGINN["mean_recurrence"]
        for s in range(1, 4):
            _close(out.logits[s - 1], huginn_reference(sd, TINY_HUGINN, ids, s, h0), dtype)
        more = model(ids, state0=h0, n_loops=5).logits[-1]              # past mean_recurrence too
        _close(more, huginn_reference(sd, TINY_HUGINN, ids, 5, h0), dtype)


def test_huginn_random_start_has_the_published_spread():
    model = from_huginn(random_huginn_state_dict(TINY_HUGINN), TINY_HUGINN)
    h0 = model.init_state(torch.zeros(400, 64, 32, dtype=torch.float64))
    sigma = TINY_HUGINN["init_values"]["std"] * math.sqrt(32)             # sqrt(2/5)
    assert math.isclose(sigma, math.sqrt(2 / 5))
    assert abs(h0.std().item() - sigma * 0.98658) < 0.005 and h0.abs().max() <= 3 * sigma


def test_load_pretrained_equals_direct_conversion():
    tmp_path, ids = Path(tempfile.mkdtemp()), _ids()
    for cfg, sd, convert in ((OURO_GQA, random_ouro_state_dict(OURO_GQA), from_ouro),
                             (TINY_HUGINN, random_huginn_state_dict(TINY_HUGINN), from_huginn)):
        direct = convert(sd, cfg)
        h0 = torch.randn(2, 10, 32, dtype=torch.float64)
        for shards in (1, 2):
            loaded = load_pretrained(write_pretrained(tmp_path / f"{cfg['model_type']}-{shards}", sd, cfg, shards))
            assert loaded.config == direct.config
            assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), direct.state_dict().values()))
            assert torch.equal(loaded(ids, state0=h0).logits, direct(ids, state0=h0).logits)
    bare = random_huginn_state_dict(TINY_HUGINN, lm_head=False, freqs_cis=False)
    full = random_huginn_state_dict(TINY_HUGINN)
    h0 = torch.randn(2, 10, 32, dtype=torch.float64)
    assert torch.equal(from_huginn(bare, TINY_HUGINN)(ids, state0=h0).logits,
                       from_huginn(full, TINY_HUGINN)(ids, state0=h0).logits)
    tied = {**TINY_OURO, "tie_word_embeddings": True}
    model = from_ouro(random_ouro_state_dict(tied), tied)
    assert model.lm_head.weight is model.embed.weight


def test_overrides_and_dtype():
    sd = random_ouro_state_dict(TINY_OURO)
    model = from_ouro(sd, TINY_OURO, n_loops=5, max_seq_len=32, dtype=torch.float32)
    assert model.config.n_loops == 5 and model.config.max_seq_len == 32
    assert all(p.dtype == torch.float32 for p in model.parameters()) and model.rope.cos.dtype == torch.float32
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    with pytest.raises(TypeError, match="n_loop"):
        from_ouro(sd, TINY_OURO, n_loop=5)
    huginn = from_huginn(random_huginn_state_dict(TINY_HUGINN), TINY_HUGINN, init_state="zeros")
    assert huginn.config.init_state == "zeros"


def test_pairs_to_halves_is_a_per_head_permutation():
    rows = torch.arange(2 * 8 * 3).reshape(16, 3)
    got = pairs_to_halves(rows, 2, 8)
    assert got[:, 0].tolist() == [3 * r for r in (0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)]
    assert pairs_to_halves(torch.arange(16), 2, 8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]


def _raises(match, convert, sd, cfg):
    with pytest.raises(ConversionError, match=match):
        convert(sd, cfg)


def test_bad_checkpoints_name_the_key():
    sd = random_ouro_state_dict(TINY_OURO)
    _raises("'model.norm.weight'", from_ouro, {k: v for k, v in sd.items() if k != "model.norm.weight"}, TINY_OURO)
    _raises("'lm_head.weight'", from_ouro, {k: v for k, v in sd.items() if k != "lm_head.weight"}, TINY_OURO)
    _raises(r"'model.layers.0.self_attn.q_proj.bias'", from_ouro,
            {**sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, TINY_OURO)
    _raises(r"'model.layers.1.mlp.up_proj.weight' has shape \[47, 32\]", from_ouro,
            {**sd, "model.layers.1.mlp.up_proj.weight": torch.zeros(47, 32)}, TINY_OURO)
    hg = random_huginn_state_dict(TINY_HUGINN)
    _raises("'lm_head.weight' differs", from_huginn, {**hg, "lm_head.weight": hg["lm_head.weight"] + 1}, TINY_HUGINN)
    _raises("'freqs_cis'", from_huginn, {**hg, "freqs_cis": hg["freqs_cis"].flip(1)}, TINY_HUGINN)
    _raises("'transformer.coda.0.attn.qk_bias'", from_huginn,
            {k: v for k, v in hg.items() if k != "transformer.coda.0.attn.qk_bias"}, TINY_HUGINN)


def test_configs_looplm_cannot_express_name_the_field():
    sd, hg = random_ouro_state_dict(TINY_OURO), random_huginn_state_dict(TINY_HUGINN)
    for field, value in (("hidden_act", "gelu"), ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                         ("layer_types", ["full_attention", "sliding_attention"]), ("head_dim", 16)):
        _raises(f"'{field}'", from_ouro, sd, {**TINY_OURO, field: value})
    _raises("'layer_types'", from_ouro, sd, {**TINY_OURO, "use_sliding_window": True, "max_window_layers": 1})
    _raises("'hidden_size'", from_ouro, sd, {k: v for k, v in TINY_OURO.items() if k != "hidden_size"})
    _raises("'num_hidden_layers' must be an int", from_ouro, sd, {**TINY_OURO, "num_hidden_layers": "2"})
    for field, value in (("injection_type", "additive"), ("state_init", "zero"), ("bias", True),
                         ("test_time_noise", 0.1), ("n_layers", 5), ("num_key_value_heads", 2),
                         ("nonlin_name", "GELU"), ("num_attention_heads", 8)):
        _raises(f"'{field}'", from_huginn, hg, {**TINY_HUGINN, field: value})
    bad_scale = {**TINY_HUGINN, "init_values": {**TINY_HUGINN["init_values"], "embed_scale": 1.0}}
    _raises("'init_values.embed_scale'", from_huginn, hg, bad_scale)


def test_load_pretrained_bad_folders():
    tmp_path = Path(tempfile.mkdtemp())
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY_OURO))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_pretrained(tmp_path)
    write_pretrained(tmp_path / "x", random_ouro_state_dict(TINY_OURO), {**TINY_OURO, "model_type": "llama"})
    with pytest.raises(ConversionError, match="'model_type' = 'llama'"):
        load_pretrained(tmp_path / "x")

# --- book/08_real_models.py:1400 (cell 52) ---
def reference_select_decode(sd, cfg, prompt, n_new, q=None, weighted=False):
    """Greedy decoding with Ouro's own readout at every position, recomputed from scratch."""
    seq, logits = torch.tensor([prompt]), []
    for _ in range(n_new):
        ref = ouro_reference(sd, cfg, seq, exit_threshold=q)
        last = (ref["expected_logits"] if weighted else ref["logits"] if q is not None else ref["step_logits"][-1])[0, -1]
        logits.append(last)
        seq = torch.cat([seq, last.argmax().view(1, 1)], 1)
    return seq[0, len(prompt):], torch.stack(logits)


def test_select_decoding_is_ouros_and_skip_differs():
    for cfg in (TINY_OURO, OURO_GQA):
        sd = random_ouro_state_dict(cfg, seed=6)
        model, prompt = from_ouro(sd, cfg), [3, 14, 15, 9, 26, 5]
        for q in (0.3, 0.5, 1.0):
            res = generate(model, [prompt], 8, exit_rule=QExit(q), exit_mode="select")
            tokens, logits = reference_select_decode(sd, cfg, prompt, 8, q)
            assert torch.equal(res.new_tokens[0], tokens), (cfg, q)
            torch.testing.assert_close(res.logits[0], logits, atol=1e-10, rtol=0)
        res = generate(model, [prompt], 8)                                       # no rule: full depth
        tokens, logits = reference_select_decode(sd, cfg, prompt, 8)
        assert torch.equal(res.new_tokens[0], tokens)
        torch.testing.assert_close(res.logits[0], logits, atol=1e-10, rtol=0)
        res = generate(model, [prompt], 8, weighted_exit=True)
        tokens, logits = reference_select_decode(sd, cfg, prompt, 8, weighted=True)
        assert torch.equal(res.new_tokens[0], tokens)
        torch.testing.assert_close(res.logits[0], logits, atol=1e-10, rtol=0)
    # The modes differ only where a token reads an entry that "skip" filled: a position whose token
    # exited at step e holds copies beyond e, which a later token reads if it runs deeper than e.
    differed = 0
    for seed in (6, 7):
        model = from_ouro(random_ouro_state_dict(TINY_OURO, seed=seed), TINY_OURO)
        for q in (0.3, 0.5, 0.7, 0.9):
            select = generate(model, [[3, 14, 15, 9, 26, 5]], 12, exit_rule=QExit(q), exit_mode="select")
            skip = generate(model, [[3, 14, 15, 9, 26, 5]], 12, exit_rule=QExit(q), exit_mode="skip")
            assert torch.equal(select.logits[0, 0], skip.logits[0, 0])         # the prefill: the same
            steps = select.steps[0, 1:]                                         # decided at fed-back positions
            deeper_later = bool((steps[1:] > steps[:-1].cummin(0).values).any())
            same = torch.equal(select.logits, skip.logits)
            if not deeper_later:
                assert same, (seed, q)
            differed += not same
    assert differed


def test_select_mode_in_a_batch_and_with_huginn():
    model = from_ouro(random_ouro_state_dict(TINY_OURO, seed=7), TINY_OURO)
    prompts = [[3, 14, 15], [9, 26, 5, 35, 8]]
    batch = generate(model, prompts, 6, exit_rule=QExit(0.5), exit_mode="select")
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], 6, exit_rule=QExit(0.5), exit_mode="select")
        assert torch.equal(batch.new_tokens[row], alone.new_tokens[0])
        torch.testing.assert_close(batch.logits[row], alone.logits[0], atol=1e-10, rtol=0)
    huginn = from_huginn(random_huginn_state_dict(TINY_HUGINN), TINY_HUGINN, init_state="zeros")
    res = generate(huginn, [[3, 14, 15, 9]], 6)
    tokens, logits = recompute_greedy(huginn, [3, 14, 15, 9], 6)
    assert torch.equal(res.new_tokens[0], tokens)
    torch.testing.assert_close(res.logits[0], logits, atol=1e-10, rtol=0)


def test_exit_options_refuse_what_they_cannot_do():
    ouro = from_ouro(random_ouro_state_dict(TINY_OURO), TINY_OURO)
    with pytest.raises(ValueError, match="exit_mode"):
        generate(ouro, [[1, 2]], 2, exit_mode="logical")
    with pytest.raises(ValueError, match="weighted_exit"):
        generate(ouro, [[1, 2]], 2, exit_rule=QExit(0.5), weighted_exit=True)
    huginn = from_huginn(random_huginn_state_dict(TINY_HUGINN), TINY_HUGINN)
    with pytest.raises(ValueError, match="exit gate"):
        generate(huginn, [[1, 2]], 2, weighted_exit=True)
