from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 1.2 (rotary position embeddings). The reference rotates each pair
# as a complex number, (x_i + j x_{i+d/2}) * exp(j m theta_i), in float64. Tolerances are
# stated in each test.

import math  # noqa: E402

import torch  # noqa: E402


def reference_angles(head_dim, max_seq_len, base=10000.0):
    """[max_seq_len, head_dim // 2] float64 angles m * base**(-2i/head_dim), with Python floats."""
    return torch.tensor([[m * base ** (-2 * i / head_dim) for i in range(head_dim // 2)]
                         for m in range(max_seq_len)], dtype=torch.float64)


def reference_rope(x, angles):
    """Rotate-half RoPE by complex multiplication, in float64. angles: [T, hs/2]."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_angles_match_formula():
    # both tables float32 of shape [max_seq_len, head_dim // 2]; values to rtol=1e-5, atol=1e-5
    for head_dim, max_seq_len, base in [(16, 64, 10000.0), (8, 20, 500.0)]:
        angles = reference_angles(head_dim, max_seq_len, base)
        cos, sin = ex.rope_angles(head_dim, max_seq_len, base)
        assert cos.shape == sin.shape == (max_seq_len, head_dim // 2)
        assert cos.dtype == sin.dtype == torch.float32
        torch.testing.assert_close(cos.double(), angles.cos(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sin.double(), angles.sin(), rtol=1e-5, atol=1e-5)


def test_apply_rope_matches_complex_rotation():
    # tables from the reference; output shape and dtype of x, values to rtol=1e-5, atol=1e-5
    torch.manual_seed(0)
    angles = reference_angles(16, 24)
    x = torch.randn(2, 3, 24, 16)
    y = ex.apply_rope(x, angles.cos().float(), angles.sin().float())
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), reference_rope(x, angles), rtol=1e-5, atol=1e-5)


def test_apply_rope_rotates_the_right_pairs():
    # a unit vector along coordinate 0 at angle pi/2 must move to coordinate d/2 (atol=1e-6):
    # this tells rotate-half apart from the interleaved layout, which would move it to 1
    x = torch.zeros(1, 1, 1, 8)
    x[..., 0] = 1.0
    angles = torch.full((1, 4), math.pi / 2, dtype=torch.float64)
    y = ex.apply_rope(x, angles.cos().float(), angles.sin().float())
    expected = torch.zeros(1, 1, 1, 8)
    expected[..., 4] = 1.0
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


def test_norms_kept_and_scores_depend_only_on_offset():
    # with your own tables: norms kept (rtol=1e-5, atol=1e-5); <R_m q, R_n k> equal for equal
    # m - n (atol=1e-4)
    torch.manual_seed(0)
    cos, sin = ex.rope_angles(16, 128)
    x = torch.randn(2, 2, 128, 16)
    torch.testing.assert_close(ex.apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1),
                               rtol=1e-5, atol=1e-5)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        qm = ex.apply_rope(q, cos[m : m + 1], sin[m : m + 1])
        kn = ex.apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    for offset in (-7, 0, 4):
        scores = torch.stack([score(n + offset, n) for n in (10, 50, 100)])
        torch.testing.assert_close(scores, scores[:1].expand(3), rtol=0, atol=1e-4)
