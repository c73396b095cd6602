from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 8.2 (the inverse of pairs_to_halves). The references are
# looplm.convert.pairs_to_halves itself (the round trip must be the identity) and the attention
# scores of the two rotary conventions, computed independently here.

import pytest  # noqa: E402
import torch  # noqa: E402

from looplm.block import apply_rope  # noqa: E402
from looplm.convert import pairs_to_halves  # noqa: E402


def test_round_trips_both_ways():
    for H, hs in ((1, 2), (2, 8), (3, 6)):
        w = torch.randn(H * hs, 5)
        back = ex.halves_to_pairs(pairs_to_halves(w, H, hs), H, hs)
        assert torch.equal(back, w)
        assert torch.equal(pairs_to_halves(ex.halves_to_pairs(w, H, hs), H, hs), w)
        bias = torch.randn(H * hs)
        assert torch.equal(ex.halves_to_pairs(pairs_to_halves(bias, H, hs), H, hs), bias)
    rows = torch.arange(8)
    assert ex.halves_to_pairs(rows, 1, 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_interleaved_rope_on_the_result_gives_looplms_scores():
    torch.manual_seed(0)
    H, hs, T = 2, 8, 5
    x = torch.randn(1, T, 12, dtype=torch.float64)
    w_q, w_k = torch.randn(H * hs, 12, dtype=torch.float64), torch.randn(H * hs, 12, dtype=torch.float64)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), 1e4 ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs))
    heads = lambda w: (x @ w.T).view(1, T, H, hs).transpose(1, 2)      # noqa: E731

    def interleaved(t):
        re, im = t[..., 0::2], t[..., 1::2]
        c, s = angles.cos(), angles.sin()
        return torch.stack([re * c - im * s, im * c + re * s], -1).flatten(-2)

    ours = apply_rope(heads(w_q), angles.cos(), angles.sin()) @ apply_rope(heads(w_k), angles.cos(), angles.sin()).mT
    theirs = interleaved(heads(ex.halves_to_pairs(w_q, H, hs))) @ interleaved(heads(ex.halves_to_pairs(w_k, H, hs))).mT
    torch.testing.assert_close(theirs, ours, atol=1e-12, rtol=0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        ex.halves_to_pairs(torch.zeros(10, 3), 2, 5)
    with pytest.raises(ValueError):
        ex.halves_to_pairs(torch.zeros(12, 3), 2, 8)
