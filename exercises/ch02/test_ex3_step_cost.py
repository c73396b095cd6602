from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 2.3 (what a step costs). The reference is a measurement: a forward hook
# on every nn.Linear of a real LoopLM (or GPT) adds 2 * in * out * (tokens it was applied to) to
# the part of the model the layer belongs to. The counts are integers and must agree exactly.

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from looplm.model import GPT, GPTConfig, LoopLM, LoopLMConfig  # noqa: E402

PARTS = ("prelude", "core", "coda", "head")


def measured_flops(model, idx, **forward_args):
    """{part: FLOPs} of the nn.Linear calls of one forward pass of `model` on idx."""
    counts = {part: 0 for part in PARTS}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            part = "head" if name == "lm_head" else {"blocks": "core"}.get(name.split(".")[0], name.split(".")[0])

            def hook(module, inputs, output, part=part):
                tokens = inputs[0].numel() // module.in_features
                counts[part] += 2 * module.in_features * module.out_features * tokens

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(idx, **forward_args)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def config(**changes):
    return LoopLMConfig(**{"vocab_size": 37, "d_model": 32, "n_heads": 4, **changes})


def check(cfg, batch, seq_len, n_loops=None):
    torch.manual_seed(0)
    model = LoopLM(cfg)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    expected = measured_flops(model, idx, **({} if n_loops is None else {"n_loops": n_loops}))
    got = ex.linear_flops(cfg, batch * seq_len, n_loops)
    assert isinstance(got, dict) and set(got) == set(PARTS), got
    assert all(type(v) is int for v in got.values()), got
    assert got == expected, (cfg, got, expected)


def test_matches_the_measured_count():
    # exact, for several shapes, widths, norm placements and an untied head
    check(config(n_loops=4), 2, 7)
    check(config(n_prelude=1, n_core=2, n_coda=1, n_loops=3, norm_style="sandwich"), 3, 5)
    check(config(d_model=48, n_prelude=2, n_core=1, n_coda=2, n_loops=5, d_hidden=40,
                 norm_style="huginn", tie_embeddings=False), 1, 9)


def test_the_n_loops_argument_and_growth_with_steps():
    # n_loops overrides the config (exact); the prelude's cost is paid once, the rest per step
    cfg = config(n_prelude=1, n_core=2, n_coda=1, n_loops=2)
    check(cfg, 2, 6, n_loops=1)
    check(cfg, 2, 6, n_loops=6)
    one, four = ex.linear_flops(cfg, 100, 1), ex.linear_flops(cfg, 100, 4)
    assert four["prelude"] == one["prelude"]
    assert all(four[part] == 4 * one[part] for part in ("core", "coda", "head"))
    assert ex.linear_flops(cfg, 300, 4) == {part: 3 * v for part, v in four.items()}


def test_one_step_is_a_gpt_and_more_steps_cost_more_than_depth():
    # the LoopLM of a GPT's stack, one step, computes what the GPT computes (measured on the GPT);
    # a 1-block loop of 6 steps pays the GPT of depth 6 plus 5 extra readouts
    torch.manual_seed(1)
    gpt = GPT(GPTConfig(vocab_size=37, d_model=32, n_heads=4, n_layers=6))
    idx = torch.randint(0, 37, (2, 8))
    gpt_total = sum(measured_flops(gpt, idx).values())
    assert sum(ex.linear_flops(config(n_core=6, n_loops=1), 16).values()) == gpt_total
    looped = ex.linear_flops(config(n_core=1, n_loops=6), 16)
    assert sum(looped.values()) == gpt_total + 5 * looped["head"] // 6


def test_bad_arguments_raise_value_error():
    good = config()
    for args in ((good, 0), (good, 2.0), (good, True), (good, 8, 0), (good, 8, True),
                 (config(injection="add"), 8), (config(exit_gate=True), 8), ("config", 8)):
        with pytest.raises(ValueError):
            ex.linear_flops(*args)
