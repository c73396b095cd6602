from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 1.4 (how RoPE forgets). The reference is a measurement with the
# package's rope_angles and apply_rope: the scores of vectors rotated to two positions.
# - Averaged over an orthonormal basis (every coordinate vector once), the mean score equals the
#   expectation over standard normal vectors exactly: agreement within 1e-5.
# - Averaged over 4,000 random normal vectors, the ratio has a standard error below 0.005:
#   agreement within 0.02.

import pytest  # noqa: E402
import torch  # noqa: E402

from looplm.block import apply_rope, rope_angles  # noqa: E402


def rotated(x, position, cos, sin):
    """x [N, head_dim] rotated to `position`: apply_rope on a [1, 1, N, head_dim] tensor."""
    n = x.shape[0]
    rows = (cos[position].expand(n, -1), sin[position].expand(n, -1))   # (N, hs/2) each
    return apply_rope(x[None, None], *rows)[0, 0]


def measured(vectors, offset, head_dim, base, key_position=3000):
    """mean <rope_{n+offset}(q), rope_n(q)> / mean |q|^2 over the rows q of `vectors`."""
    cos, sin = rope_angles(head_dim, 6001, base, dtype=torch.float64)
    q = rotated(vectors, key_position + offset, cos, sin)
    k = rotated(vectors, key_position, cos, sin)
    return ((q * k).sum(-1).mean() / vectors.pow(2).sum(-1).mean()).item()


def test_matches_the_basis_average():
    # the expectation, measured exactly; within 1e-5
    for head_dim, base in ((8, 10000.0), (16, 10000.0), (64, 10000.0), (32, 500.0)):
        basis = torch.eye(head_dim, dtype=torch.float64)
        for offset in (0, 1, 2, 5, 17, 100, 1000, 2999, -7, -250):
            got = ex.rope_similarity(offset, head_dim, base)
            assert isinstance(got, float), type(got)
            assert abs(got - measured(basis, offset, head_dim, base)) < 1e-5, (head_dim, base, offset)


def test_matches_random_vectors():
    # 4,000 standard normal vectors of head_dim 16; within 0.02
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(4000, 16, generator=generator, dtype=torch.float64)
    for offset in (1, 3, 10, 40, 200):
        got = ex.rope_similarity(offset, 16)
        assert abs(got - measured(vectors, offset, 16, 10000.0)) < 0.02, offset


def test_shape_of_the_decay():
    # 1 at offset 0, symmetric, never above 1; close positions stay similar, far ones much less
    for head_dim in (16, 64):
        assert ex.rope_similarity(0, head_dim) == pytest.approx(1.0, abs=1e-12)
        for offset in (1, 9, 300):
            assert ex.rope_similarity(-offset, head_dim) == pytest.approx(ex.rope_similarity(offset, head_dim),
                                                                          abs=1e-12)
            assert abs(ex.rope_similarity(offset, head_dim)) <= 1 + 1e-12
        far = sum(ex.rope_similarity(offset, head_dim) for offset in range(1000, 2000)) / 1000
        assert ex.rope_similarity(1, head_dim) > 0.9 and far < 0.3, (head_dim, far)
    # a larger base turns every pair more slowly, so it forgets more slowly
    assert ex.rope_similarity(50, 16, base=1e6) > ex.rope_similarity(50, 16, base=100.0)


def test_bad_arguments_raise_value_error():
    for args in ((1, 15), (1, 0), (1, 16, 1.0), (1, 16, -2.0), (1.5, 16), (True, 16), (1, True), (1, 16.0)):
        with pytest.raises(ValueError):
            ex.rope_similarity(*args)
