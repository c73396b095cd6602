import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before the exercise imports triton

from looplm.grade import load_exercise  # noqa: E402

ex = load_exercise(__file__)

# Graded tests for Exercise 10.1 (a masked row-wise softmax kernel). The reference is torch's
# softmax over each row's real entries, in float64, and hand-computed rows.

import math  # noqa: E402

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, lengths):
    y = torch.zeros_like(x, dtype=torch.float64)
    for r, n in enumerate(lengths.tolist()):
        y[r, :n] = x[r, :n].double().softmax(0)
    return y


def test_hand_computed_rows():
    x = torch.tensor([[0.0, 0.0, 5.0], [1.0, 2.0, 3.0]], device=DEVICE)
    y = ex.masked_softmax(x, torch.tensor([2, 3], device=DEVICE))
    e = [math.exp(v) for v in (1.0, 2.0, 3.0)]
    want = torch.tensor([[0.5, 0.5, 0.0], [v / sum(e) for v in e]], dtype=torch.float64)
    assert torch.allclose(y.double().cpu(), want, atol=1e-6, rtol=0)
    assert type(ex._masked_softmax_kernel).__name__ in ("JITFunction", "InterpretedFunction")   # a Triton kernel


@pytest.mark.parametrize("N,D", [(5, 7), (3, 100), (1, 1)])
def test_matches_torch_on_any_width_with_padding(N, D):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(N, D, generator=g) * 3
    lengths = torch.randint(1, D + 1, (N,), generator=g)
    lengths[0] = D
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
        y = ex.masked_softmax(x.to(DEVICE, dtype), lengths.to(DEVICE))
        assert y.dtype == dtype and y.shape == (N, D)
        assert (y.double().cpu() - reference(x.to(dtype), lengths)).abs().max() <= tol
        for r, n in enumerate(lengths.tolist()):
            assert (y[r, n:] == 0).all()


def test_large_values_do_not_overflow_and_bad_lengths_are_refused():
    x = torch.tensor([[1000.0, 1001.0, -5.0, 7.0]], device=DEVICE)
    y = ex.masked_softmax(x, torch.tensor([2], device=DEVICE))
    assert torch.isfinite(y).all() and abs(y[0, :2].sum().item() - 1) < 1e-6
    for bad in (0, 5):
        with pytest.raises(ValueError):
            ex.masked_softmax(x, torch.tensor([bad], device=DEVICE))
