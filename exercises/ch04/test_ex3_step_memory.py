from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 4.3 (the memory of one more step). The reference is the package's
# own measurement: section 4.3's saved_tensor_bytes around loop_forward's loss, at S and S + 1
# steps, on tiny models of several shapes and dtypes. Bytes are integers: they must match
# exactly.

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from looplm.backprop import loop_forward, saved_tensor_bytes  # noqa: E402
from looplm.model import LoopLM, LoopLMConfig  # noqa: E402

BASE = LoopLMConfig(vocab_size=13, d_model=16, n_heads=2, max_seq_len=8)
SHAPES = [
    BASE,
    dataclasses.replace(BASE, vocab_size=29, d_model=24, n_heads=3, n_prelude=1, n_core=2, n_coda=1,
                        tie_embeddings=False),
    dataclasses.replace(BASE, d_model=32, n_heads=4, injection="concat", norm_style="sandwich"),
]


def measured(config, batch, seq_len, n_loops, dtype=torch.float32, **knobs):
    """saved(S + 1) - saved(S): what one more step adds, measured."""
    torch.manual_seed(0)
    model = LoopLM(config).to(dtype)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, config.vocab_size, (batch, seq_len), generator=g)
    targets = torch.randint(0, config.vocab_size, (batch, seq_len), generator=g)
    params = list(model.parameters())

    def saved(S):
        return saved_tensor_bytes(lambda: loop_forward(model, idx, targets, n_loops=S, **knobs).loss, params)[0]

    return saved(n_loops + 1) - saved(n_loops)


def test_checkpointed_steps():
    for config in SHAPES:
        for batch, seq_len in ((3, 6), (2, 8)):
            for readout in ("all", "last"):
                got = ex.extra_step_bytes(config, batch, seq_len, checkpoint=True, readout=readout)
                assert isinstance(got, int), type(got)
                expected = measured(config, batch, seq_len, 2, checkpoint=True, readout=readout)
                assert got == expected, (config.d_model, batch, seq_len, readout, got, expected)
    # the same bytes at every depth
    assert ex.extra_step_bytes(BASE, 3, 6, checkpoint=True) == measured(BASE, 3, 6, 4, checkpoint=True)


def test_truncated_steps():
    for config in SHAPES[:2]:
        for grad_steps, n_loops in ((1, 2), (2, 3), (2, 5)):
            for checkpoint in (False, True):
                for readout in ("all", "last"):
                    knobs = dict(grad_steps=grad_steps, checkpoint=checkpoint, readout=readout)
                    got = ex.extra_step_bytes(config, 3, 6, **knobs)
                    expected = measured(config, 3, 6, n_loops, **knobs)
                    assert got == expected, (config.d_model, knobs, n_loops, got, expected)


def test_other_dtypes():
    for dtype in (torch.float64, torch.bfloat16):
        for knobs in (dict(checkpoint=True), dict(checkpoint=True, readout="last"), dict(grad_steps=1)):
            got = ex.extra_step_bytes(BASE, 3, 6, dtype=dtype, **knobs)
            expected = measured(BASE, 3, 6, 2, dtype=dtype, **knobs)
            assert got == expected, (dtype, knobs, got, expected)


def test_refuses_what_it_cannot_predict():
    for config, knobs in ((BASE, {}), (BASE, dict(readout="last")),
                          (dataclasses.replace(BASE, exit_gate=True), dict(checkpoint=True)),
                          (BASE, dict(checkpoint=True, readout="first")),
                          (BASE, dict(grad_steps=0)), (BASE, dict(grad_steps=1.5)), (BASE, dict(grad_steps=True))):
        with pytest.raises(ValueError):
            ex.extra_step_bytes(config, 3, 6, **knobs)
