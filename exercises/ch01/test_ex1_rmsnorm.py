from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 1.1 (RMSNorm): each compares against a float64 reference with the
# tolerances stated in its comment.

import torch  # noqa: E402


def reference(x, weight, eps):
    """RMSNorm in float64, from the formula."""
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.double()


def test_matches_float64_reference():
    # rtol=1e-5, atol=1e-6 on a random [4, 6, 32] input with a random gain
    torch.manual_seed(0)
    x, weight = 3 * torch.randn(4, 6, 32), torch.randn(32)
    y = ex.rms_norm(x, weight, eps=1e-5)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(x, weight, 1e-5), rtol=1e-5, atol=1e-6)


def test_eps_inside_the_square_root():
    # small inputs, where eps matters; an all-zero row must give zeros, not NaN. rtol=1e-5, atol=1e-7
    torch.manual_seed(0)
    x, weight = 1e-3 * torch.randn(3, 16), torch.rand(16) + 0.5
    x[1] = 0.0
    y = ex.rms_norm(x, weight, eps=1e-4)
    torch.testing.assert_close(y.double(), reference(x, weight, 1e-4), rtol=1e-5, atol=1e-7)


def test_no_mean_subtraction():
    # a constant row c has RMS |c|, so it maps to sign(c) * weight (LayerNorm would give 0). atol=1e-5
    weight = torch.linspace(0.5, 2.0, 8)
    x = torch.tensor([[5.0] * 8, [-2.0] * 8])
    expected = torch.stack([weight, -weight])
    torch.testing.assert_close(ex.rms_norm(x, weight), expected, rtol=0, atol=1e-5)


def test_low_precision_computed_in_float32():
    # float16 values near 300 square past float16's maximum (65504); bfloat16 loses precision.
    # The output keeps the input dtype and matches the float64 reference to rtol=atol=2e-2.
    torch.manual_seed(0)
    x, weight = 300 * torch.randn(5, 64), torch.randn(64)
    for dtype in (torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        y = ex.rms_norm(xd, weight)
        assert y.dtype == dtype and y.shape == x.shape, dtype
        torch.testing.assert_close(y.double(), reference(xd, weight, 1e-6), rtol=2e-2, atol=2e-2)
