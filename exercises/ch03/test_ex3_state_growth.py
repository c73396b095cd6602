from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 3.3 (how fast the state grows). The reference is a measurement with
# the package: an untrained LoopLM with additive injection and pre-norm blocks, its injection gain
# set to one value, and the mean over tokens of looplm.diagnostics.hidden_norms at every step.
# The prediction must agree within 3% (relative) at every step.

import pytest  # noqa: E402
import torch  # noqa: E402

from looplm.diagnostics import hidden_norms  # noqa: E402
from looplm.model import LoopLM, LoopLMConfig  # noqa: E402


def measured(init_state, gain, n_steps=8, d_model=64, seed=0):
    """(RMS of h_t per step averaged over tokens [n_steps], mean per-token RMS of x0)."""
    torch.manual_seed(seed)
    model = LoopLM(LoopLMConfig(vocab_size=30, d_model=d_model, n_heads=4, n_loops=n_steps,
                                injection="add", init_state=init_state, norm_style="pre"))
    idx = torch.randint(0, 30, (8, 16))
    with torch.no_grad():
        model.injection.norm.weight.fill_(gain)
        hidden = model(idx, return_hidden=True, generator=torch.Generator().manual_seed(seed)).hidden
        x0_rms = hidden_norms(model.embed(idx)[None]).mean().item()
    return hidden_norms(hidden).mean(dim=(1, 2)).tolist(), x0_rms


def check(init_state, gain, **kwargs):
    rms, x0_rms = measured(init_state, gain, **kwargs)
    predicted = ex.predicted_state_rms(len(rms), init_state, gain=gain, x0_rms=x0_rms)
    assert isinstance(predicted, list) and len(predicted) == len(rms)
    assert all(type(p) is float for p in predicted)
    for t, (p, m) in enumerate(zip(predicted, rms), start=1):
        assert abs(p - m) <= 0.03 * m, (init_state, gain, t, p, m)


def test_embedding_and_zero_starts():
    # within 3% at steps 1..8, gains 1 and 0.3
    for init_state in ("embedding", "zeros"):
        for gain in (1.0, 0.3):
            check(init_state, gain)


def test_random_start():
    # within 3% at steps 1..8, gains 1, 0.3 and 0.1 (where the random start dominates for longer)
    for gain in (1.0, 0.3, 0.1):
        check("random", gain)


def test_another_width_and_more_steps():
    # d_model = 128, 12 steps, within 3%
    check("zeros", 0.5, n_steps=12, d_model=128, seed=1)
    check("random", 0.5, n_steps=12, d_model=128, seed=1)


def test_bad_arguments_raise_value_error():
    for args in ((0, "zeros"), (2.0, "zeros"), (True, "zeros"), (4, "noise"), (4, "zeros", 0.0),
                 (4, "zeros", -1.0), (4, "zeros", True), (4, "embedding", 1.0, -0.1)):
        with pytest.raises(ValueError):
            ex.predicted_state_rms(*args)
