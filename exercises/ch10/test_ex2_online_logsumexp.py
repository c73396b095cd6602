import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before the exercise imports triton

from looplm.grade import load_exercise  # noqa: E402

ex = load_exercise(__file__)

# Graded tests for Exercise 10.2 (the online log-sum-exp). The reference is torch.logsumexp in
# float64; rows are many blocks long, hold huge values, and -inf.

import math  # noqa: E402

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("D,block", [(100, 16), (7, 4), (33, 32), (1, 1)])
def test_matches_torch_over_many_blocks(D, block):
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(D)) * 4
    x[0, -1] = 30.0                                          # the maximum arrives in the last block
    for dtype in (torch.float32, torch.float16):
        got = ex.logsumexp_rows(x.to(DEVICE, dtype), block=block)
        want = torch.logsumexp(x.to(dtype).double(), dim=1)
        assert got.dtype == torch.float32 and got.shape == (6,)
        assert (got.double().cpu() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


def test_huge_values_and_minus_infinity():
    x = torch.tensor([[1000.0, 1000.0, -float("inf"), 999.0] + [-float("inf")] * 20,
                      [-float("inf")] * 20 + [0.0, 0.0, 0.0, 0.0]], device=DEVICE)
    got = ex.logsumexp_rows(x, block=4).double().cpu()
    want = torch.tensor([1000 + math.log(2 + math.exp(-1)), math.log(4)], dtype=torch.float64)
    assert torch.isfinite(got).all() and (got - want).abs().max() <= 1e-4


def test_a_block_that_is_not_a_power_of_two_is_refused():
    x = torch.randn(2, 8, device=DEVICE)
    assert ex.logsumexp_rows(x, block=8).shape == (2,)
    for bad in (0, 3, 12):
        with pytest.raises(ValueError):
            ex.logsumexp_rows(x, block=bad)
