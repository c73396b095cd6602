import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before the exercise imports triton

from looplm.grade import load_exercise  # noqa: E402

ex = load_exercise(__file__)

# Graded tests for Exercise 10.3 (GeGLU's backward as a kernel). The reference is autograd through
# F.gelu(g, approximate="tanh") * u in float64.

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(g, u, dy):
    g, u = g.double().requires_grad_(), u.double().requires_grad_()
    (F.gelu(g, approximate="tanh") * u * dy.double()).sum().backward()
    return g.grad, u.grad


@pytest.mark.parametrize("shape", [(3, 5, 77), (1,), (2049,)])
def test_matches_autograd_in_float32_and_float16(shape):
    gen = torch.Generator().manual_seed(len(shape))
    g, u, dy = (torch.randn(shape, generator=gen) * 3 for _ in range(3))
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 4e-3)):
        dg, du = ex.geglu_backward(g.to(DEVICE, dtype), u.to(DEVICE, dtype), dy.to(DEVICE, dtype))
        want_dg, want_du = reference(g.to(dtype), u.to(dtype), dy.to(dtype))
        assert dg.dtype == dtype and du.dtype == dtype and dg.shape == g.shape
        for got, want in ((dg, want_dg), (du, want_du)):
            assert (got.double().cpu() - want).abs().max() / want.abs().max() <= tol


def test_known_points_and_mismatched_inputs():
    g = torch.tensor([0.0, 1.0, -1.0], device=DEVICE)
    one = torch.ones(3, device=DEVICE)
    dg, du = ex.geglu_backward(g, one, one)
    assert abs(dg[0].item() - 0.5) < 1e-6 and abs(du[0].item()) < 1e-7       # gelu'(0) = 1/2, gelu(0) = 0
    assert abs(du[1].item() - F.gelu(torch.tensor(1.0), approximate="tanh").item()) < 1e-6
    with pytest.raises(ValueError):
        ex.geglu_backward(g, one[:2], one)
