from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 1.3 (causal attention by hand). The masks are compared exactly with
# masks written out element by element; attention is compared with PyTorch's
# scaled_dot_product_attention to rtol=1e-5, atol=1e-5.

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def reference_mask(t_q, t_k):
    """The mask element by element: query i is at position i + t_k - t_q and sees keys <= it."""
    mask = torch.zeros(t_q, t_k)
    for i in range(t_q):
        for j in range(t_k):
            if j > i + (t_k - t_q):
                mask[i, j] = float("-inf")
    return mask


def test_square_mask():
    # exact: 0 on and below the diagonal, -inf above, float32
    for t in (1, 4, 9):
        mask = ex.causal_mask(t, t)
        assert mask.shape == (t, t) and mask.dtype == torch.float32
        assert torch.equal(mask, reference_mask(t, t))


def test_mask_with_fewer_queries_than_keys():
    # exact: the queries are the last t_q positions
    for t_q, t_k in [(1, 6), (2, 5), (3, 8)]:
        assert torch.equal(ex.causal_mask(t_q, t_k), reference_mask(t_q, t_k)), (t_q, t_k)


def test_attention_matches_sdpa():
    # square case against is_causal=True, rtol=1e-5, atol=1e-5
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 16, 8).unbind(0)  # each (B=2, nh=4, T=16, hs=8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y = ex.causal_attention(q, k, v)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_last_queries_against_all_keys():
    # the last 3 queries against all 10 keys equal the last 3 rows of full causal attention
    # (rtol=1e-5, atol=1e-5): what a KV cache relies on
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 10, 8).unbind(0)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y = ex.causal_attention(q[:, :, -3:], k, v)
    assert y.shape == (1, 2, 3, 8)
    torch.testing.assert_close(y, full[:, :, -3:], rtol=1e-5, atol=1e-5)


def test_first_position_reads_only_its_own_value():
    # query 0 sees key 0 only, so its output is v[..., 0, :] (rtol=1e-5, atol=1e-6),
    # however large the other scores are
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 7, 4).unbind(0)
    k[..., 1:, :] *= 100.0
    y = ex.causal_attention(q, k, v)
    torch.testing.assert_close(y[..., 0, :], v[..., 0, :], rtol=1e-5, atol=1e-6)
