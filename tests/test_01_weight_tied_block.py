# Generated from book/01_weight_tied_block.py: edit the chapter, then run `make export`.

import pytest
import torch
import torch.nn.functional as F

from looplm.block import (  # noqa: F401
    RMSNorm,
    rope_angles,
    apply_rope,
    RotaryEmbedding,
    causal_mask,
    attention_reference,
    CausalSelfAttention,
    default_d_hidden,
    SwiGLU,
    NORM_STYLES,
    Block,
    block_param_count,
)

# --- book/01_weight_tied_block.py:239 (cell 24) ---
def _rmsnorm_float64(x, weight, eps):
    """The RMSNorm formula in float64, written independently of the module."""
    x64, w64 = x.double(), weight.double()
    return x64 / torch.sqrt(x64.pow(2).mean(dim=-1, keepdim=True) + eps) * w64


def test_rmsnorm_matches_float64_reference():
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    x = 3 * torch.randn(4, 7, 32)
    expected = _rmsnorm_float64(x, norm.weight, 1e-5)
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_rmsnorm_eps_on_small_and_zero_rows():
    # rows whose mean square (1e-8) is far below eps (1e-5), and an all-zero row: there eps sets
    # the output, so a norm that dropped eps, or added it outside the root, fails this
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    x = 1e-4 * torch.randn(3, 32, dtype=torch.float64)
    x = torch.cat([x, torch.zeros(1, 32, dtype=torch.float64)])
    y = norm(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _rmsnorm_float64(x, norm.weight, 1e-5), rtol=1e-12, atol=1e-15)
    assert torch.equal(y[-1], torch.zeros(32, dtype=torch.float64))
    # the same rows in float32 agree with the float64 formula to float32 precision
    y32 = RMSNorm(32, eps=1e-5)(x.float())
    torch.testing.assert_close(y32.double(), _rmsnorm_float64(x.float(), torch.ones(32), 1e-5),
                               rtol=1e-5, atol=1e-7)

# --- book/01_weight_tied_block.py:287 (cell 26) ---
def test_rmsnorm_low_precision_input():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    x = 300 * torch.randn(2, 16)  # x**2 overflows float16: the sum must be taken in float32
    for dtype in (torch.float16, torch.bfloat16):
        y = norm(x.to(dtype))
        assert y.dtype == dtype and y.shape == x.shape
        expected = _rmsnorm_float64(x.to(dtype), norm.weight, 1e-6)
        torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)

# --- book/01_weight_tied_block.py:500 (cell 51) ---
def _rope_complex(x, positions, base=10000.0):
    """Rotate-half RoPE via complex numbers: (x_i + j x_{i+d/2}) * exp(j m theta_i)."""
    hs = x.shape[-1]
    theta = base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    z = torch.complex(x[..., : hs // 2].double(), x[..., hs // 2 :].double())
    angles = torch.outer(positions.double(), theta)
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_matches_complex_rotation():
    torch.manual_seed(0)
    cos, sin = rope_angles(16, 32)
    x = torch.randn(2, 3, 32, 16)
    expected = _rope_complex(x, torch.arange(32))
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), expected, rtol=1e-5, atol=1e-5)

# --- book/01_weight_tied_block.py:526 (cell 53) ---
def test_rope_preserves_norm():
    torch.manual_seed(0)
    cos, sin = rope_angles(32, 50)
    x = torch.randn(3, 2, 50, 32)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))

# --- book/01_weight_tied_block.py:537 (cell 54) ---
def test_rope_scores_depend_only_on_offset():
    torch.manual_seed(0)
    cos, sin = rope_angles(16, 128)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        qm = apply_rope(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    for offset in (-5, 0, 3, 17):
        scores = torch.stack([score(n + offset, n) for n in (20, 40, 60, 100)])
        torch.testing.assert_close(scores, scores[:1].expand(4), rtol=0, atol=1e-4)
    assert not torch.allclose(score(3, 0), score(0, 3))  # the sign of the offset matters

# --- book/01_weight_tied_block.py:562 (cell 56) ---
def test_rope_per_row_tables_match_row_by_row():
    torch.manual_seed(0)
    cos, sin = rope_angles(16, 64)
    x = torch.randn(3, 2, 5, 16)
    starts = (0, 7, 30)
    rows_cos = torch.stack([cos[s : s + 5] for s in starts])          # (B, T, hs/2)
    rows_sin = torch.stack([sin[s : s + 5] for s in starts])
    together = apply_rope(x, rows_cos, rows_sin)
    for b, s in enumerate(starts):
        torch.testing.assert_close(together[b : b + 1], apply_rope(x[b : b + 1], cos[s : s + 5], sin[s : s + 5]),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="cos must have shape"):
        apply_rope(x, rows_cos[:2], rows_sin[:2])                     # 2 tables for 3 rows

# --- book/01_weight_tied_block.py:643 (cell 62) ---
def test_rope_tables_follow_the_dtype():
    rope = RotaryEmbedding(head_dim=16, max_seq_len=300).double()
    cos64, sin64 = rope_angles(16, 300, dtype=torch.float64)
    assert rope.cos.dtype == torch.float64
    assert torch.equal(rope.cos, cos64) and torch.equal(rope.sin, sin64)
    assert not torch.equal(rope.cos, cos64.float().double())   # more than float32's digits
    rope = rope.float()
    assert rope.cos.dtype == torch.float32 and torch.equal(rope.cos, rope_angles(16, 300)[0])

# --- book/01_weight_tied_block.py:911 (cell 97) ---
def test_reference_attention_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 20, 16).unbind(0)
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention_reference(q, k, v), fused, rtol=1e-5, atol=1e-6)
    full = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention_reference(q, k, v, causal=False), full,
                               rtol=1e-5, atol=1e-6)

# --- book/01_weight_tied_block.py:929 (cell 99) ---
def test_causal_mask_aligns_queries_to_last_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 9, 8).unbind(0)
    full = attention_reference(q, k, v)
    torch.testing.assert_close(attention_reference(q[:, :, -3:], k, v), full[:, :, -3:])
    allowed = causal_mask(2, 5) == 0
    assert allowed.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]

# --- book/01_weight_tied_block.py:946 (cell 101) ---
def _changes_only_from(module_call, x, t0):
    """Change x from position t0 on; return (max change before t0, max change from t0)."""
    x2 = x.clone()
    x2[:, t0:] = torch.randn_like(x2[:, t0:])
    with torch.no_grad():
        y1, y2 = module_call(x), module_call(x2)
    before = (y1[:, :t0] - y2[:, :t0]).abs().max().item()
    after = (y1[:, t0:] - y2[:, t0:]).abs().max().item()
    return before, after


def test_attention_is_causal():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4)
    cos, sin = RotaryEmbedding(8, 16)(16)
    before, after = _changes_only_from(lambda x: attn(x, cos, sin), torch.randn(2, 16, 32), 9)
    assert before < 1e-6 and after > 1e-3

# --- book/01_weight_tied_block.py:1150 (cell 121) ---
def test_attend_hook_replaces_the_attention_op():
    torch.manual_seed(0)
    cos, sin = RotaryEmbedding(8, 16)(16)
    x = torch.randn(2, 16, 32)
    causal = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    for style in ("pre", "sandwich", "huginn"):
        block = Block(32, 4, norm_style=style)
        torch.testing.assert_close(block(x, cos, sin, attend=causal), block(x, cos, sin), rtol=0, atol=0)
    seen = []
    attn = CausalSelfAttention(32, 4)
    attn(x, cos, sin, attend=lambda q, k, v: seen.append(q.shape) or v)
    assert seen == [(2, 4, 16, 8)]

# --- book/01_weight_tied_block.py:1261 (cell 135) ---
def test_shapes():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 48)
    cos, sin = RotaryEmbedding(head_dim=12, max_seq_len=16)(10)
    assert cos.shape == sin.shape == (10, 6)
    assert RMSNorm(48)(x).shape == x.shape
    assert SwiGLU(48)(x).shape == x.shape
    attn = CausalSelfAttention(48, 4)
    assert all(t.shape == (2, 4, 10, 12) for t in attn.project_qkv(x, cos, sin))
    assert attn(x, cos, sin).shape == x.shape
    for style in NORM_STYLES:
        assert Block(48, 4, d_hidden=96, norm_style=style)(x, cos, sin).shape == x.shape

# --- book/01_weight_tied_block.py:1283 (cell 137) ---
def test_block_is_causal():
    for style in NORM_STYLES:
        torch.manual_seed(0)
        block = Block(32, 2, norm_style=style)
        cos, sin = RotaryEmbedding(16, 16)(16)
        before, after = _changes_only_from(lambda x: block(x, cos, sin), torch.randn(2, 16, 32), 5)
        assert before < 1e-5 and after > 1e-3, style

# --- book/01_weight_tied_block.py:1300 (cell 139) ---
def test_gradients_are_finite():
    for style in NORM_STYLES:
        torch.manual_seed(0)
        block = Block(32, 4, norm_style=style)
        cos, sin = RotaryEmbedding(8, 8)(8)
        h = torch.randn(2, 8, 32)
        for _ in range(3):  # the same weights, applied three times
            h = block(h, cos, sin)
        h.pow(2).mean().backward()
        for name, p in block.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (style, name)

# --- book/01_weight_tied_block.py:1383 (cell 151) ---
def test_param_count_formula():
    for d_model, n_heads, d_hidden in [(32, 2, None), (48, 4, 100), (64, 8, 64)]:
        for style in NORM_STYLES:
            block = Block(d_model, n_heads, d_hidden, norm_style=style)
            assert block_param_count(d_model, n_heads, d_hidden, style) == sum(
                p.numel() for p in block.parameters()), (d_model, style)
    assert block_param_count(64, 4, 176, "pre") == 4 * 64**2 + 3 * 64 * 176 + 2 * 64
    assert default_d_hidden(64) == 176 and default_d_hidden(768) == 2048

# --- book/01_weight_tied_block.py:1446 (cell 160) ---
def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="n_heads=3 must divide d_model=100"):
        Block(100, 3)
    with pytest.raises(ValueError, match="head_dim .* must be even"):
        CausalSelfAttention(36, 4)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_angles(15, 8)
    with pytest.raises(ValueError, match="norm_style must be one of 'pre', 'sandwich', 'huginn'"):
        Block(64, 4, norm_style="post")

# --- book/01_weight_tied_block.py:1464 (cell 162) ---
def test_bad_sizes_raise():
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="d_model must be an int >= 1"):
            Block(bad, 1)
    with pytest.raises(ValueError, match="n_heads must be an int >= 1"):
        CausalSelfAttention(64, 0)
    with pytest.raises(ValueError, match="d_hidden must be an int >= 1"):
        SwiGLU(64, 0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        RMSNorm(64, eps=0.0)

# --- book/01_weight_tied_block.py:1483 (cell 164) ---
def test_bad_inputs_raise():
    torch.manual_seed(0)
    block = Block(64, 4)
    rope = RotaryEmbedding(16, 32)
    cos, sin = rope(12)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        block(torch.randint(0, 100, (2, 12, 64)), cos, sin)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, d_model=64\]"):
        block(torch.randn(2, 12, 32), cos, sin)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, d_model=64\]"):
        block(torch.randn(12, 64), cos, sin)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        RMSNorm(8)(torch.ones(3, 8, dtype=torch.long))

# --- book/01_weight_tied_block.py:1505 (cell 166) ---
def test_bad_positions_raise():
    torch.manual_seed(0)
    block = Block(64, 4)
    rope = RotaryEmbedding(16, 32)
    cos, sin = rope(12)
    with pytest.raises(ValueError, match="sequence is too long"):
        rope(40)
    with pytest.raises(ValueError, match="longer than the rope tables"):
        block(torch.randn(2, 40, 64), cos, sin)
    with pytest.raises(ValueError, match="pass the rows for x's positions"):
        block(torch.randn(2, 5, 64), cos, sin)
    with pytest.raises(ValueError, match="t_q=3 queries need at least as many keys"):
        causal_mask(3, 2)
