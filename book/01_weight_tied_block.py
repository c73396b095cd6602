# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 1: The weight-tied block
#
# A standard transformer gets its depth from a tall stack of different layers: layer 1, then
# layer 2, and so on up to layer $L$, each with its own weights. A *looped* language model
# gets depth another way. It applies **the same block**, with the same weights, again and
# again:
#
# $$h_{t+1} = \mathrm{block}(h_t), \qquad t = 0, 1, \dots, S-1 .$$
#
# The weights are *tied* across the applications, so the model has the parameters of one
# block but the compute of $S$, the number of loop steps. Ouro {cite:p}`zhu2025ouro` loops its
# whole 24-layer stack 4 times; Huginn {cite:p}`geiping2025huginn` loops a core of 4 layers,
# 32 times on average.
#
# Everything in this book is built on one block, and this chapter builds it from parts:
#
# - **RMSNorm**, the normalisation layer (section 1.2);
# - **rotary position embeddings** (RoPE), which tell attention where each token sits (1.3);
# - **causal self-attention**, first written out by hand, then with PyTorch's fused kernel
#   (1.4);
# - the **SwiGLU** MLP (1.5);
# - the **block** itself, with three placements of its norms: the usual pre-norm, Ouro's
#   sandwich and Huginn's (1.6);
# - a **parameter count** from a formula, checked against PyTorch (1.7);
# - **clear errors** for bad input (1.1 and 1.8).
#
# Each part appears first in its simplest form, is checked against an obvious reference, and
# only then written in the form the package keeps. The kept code goes to `looplm/block.py`.
# The tests in this chapter run here, and they run again under pytest.

# %% [markdown]
# We work in plain PyTorch on the CPU. Every random tensor comes from a seeded generator, so
# every number below is the same each time the chapter runs.

# %% tags=["hide-input"]
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from looplm.testing import run_tests

_ = torch.manual_seed(0)
print("torch", torch.__version__)

# %% [markdown]
# The next cell names the module that this chapter's `#| export` cells go to: `looplm/block.py`.
# The cell after it holds the module's imports.

# %%
#| default_exp block

# %% tags=["hide-input"]
#| export
import math

import torch
import torch.nn.functional as F
from torch import nn

from looplm.checks import require_int, require_number

# %% [markdown]
# ## 1.1 Argument checks
#
# A block that quietly accepts a wrong shape is hard to debug. The mistake shows up much
# later as a wrong loss, or as a shape error deep inside a matrix multiply. So every public
# function and module here checks its arguments up front, and its error message names the
# argument that is wrong. Integers and numbers go through `looplm.checks` (chapter 0); the
# tensor checks are small private functions. A forward pass runs for every block of every
# loop step, so there a check is one cheap condition, and the full diagnosis below runs only
# when that condition fails.

# %%
#| export
def _check_floating(x, name="x"):
    """Raise TypeError unless `x` is a floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype} "
                        "(token ids must go through an embedding first)")


def _check_hidden(x, d_model, name="x"):
    """Raise unless `x` is a floating-point hidden state of shape [B, T, d_model]."""
    _check_floating(x, name)
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{name} must have shape [B, T, d_model={d_model}], got {list(x.shape)}")

# %% [markdown]
# A quick look at one of them. Each check either returns quietly or raises with a message
# you can act on:

# %%
try:
    _check_hidden(torch.zeros(2, 5, 16), d_model=32)
except ValueError as e:
    print(e)

# %% [markdown]
# The message says what was expected and what arrived. Section 1.8 shows the rest of the
# checks at work, once the block exists.

# %% [markdown]
# ## 1.2 RMSNorm
#
# A deep stack of residual layers keeps adding to its hidden state, so the state's scale
# drifts. Normalisation layers pull it back. LayerNorm subtracts the mean and divides by the
# standard deviation. **RMSNorm** {cite:p}`zhang2019rmsnorm` keeps only the
# division. It rescales each vector $x \in \mathbb{R}^d$ by its root mean square and then
# multiplies by a learned gain $g \in \mathbb{R}^d$:
#
# $$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\frac{1}{d}\sum_{i=1}^{d} x_i^2 + \epsilon}} \odot g .$$

# %% [markdown]
# There is no mean subtraction and no bias. The paper reports that the re-centring is not
# what makes LayerNorm work, and dropping it saves time. The small $\epsilon$ keeps an
# all-zero vector from dividing by zero.
#
# In its simplest form, RMSNorm is a single line:

# %%
def rmsnorm_simple(x, g, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * g

x = torch.randn(2, 3, 8)
g = torch.ones(8)
y = rmsnorm_simple(x, g)
print("RMS of each output vector:", y.pow(2).mean(-1).sqrt())

# %% [markdown]
# With a unit gain, every output vector has an RMS of 1, up to $\epsilon$: whatever the
# scale of the input, the output has a fixed scale, and the gain $g$ is the only thing that
# sets it.

# %% [markdown]
# To check the arithmetic itself, we compare against the formula computed by hand in
# float64, one vector at a time with Python loops. It is the slowest and most obvious
# version we can write:

# %%
def rmsnorm_by_hand(x, g, eps=1e-6):
    """Evaluate the formula with Python floats (float64), one vector at a time."""
    rows = x.reshape(-1, x.shape[-1]).tolist()
    out = []
    for row in rows:
        rms = math.sqrt(sum(v * v for v in row) / len(row) + eps)
        out.append([v / rms * gi for v, gi in zip(row, g.tolist())])
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)

g = torch.randn(8)
diff = (rmsnorm_simple(x, g).double() - rmsnorm_by_hand(x, g)).abs().max().item()
print(f"max |simple - by hand| = {diff:.1e}")

# %% [markdown]
# A difference of about $10^{-7}$ is float32 rounding (float32 keeps about 7 significant
# digits), so the one-liner computes the formula.

# %% [markdown]
# The package version adds three things to that one line:
#
# - **argument checks**;
# - a **float32 computation** when the input is float16 or bfloat16. In those formats the sum
#   of squares loses precision, and in float16 it overflows once $x_i^2$ passes 65504. The
#   result is cast back to the input's dtype. A float64 input is computed in float64, so a
#   model converted with `.double()` can be checked against a float64 reference digit for
#   digit;
# - a **gain parameter** `weight`, initialised to ones so that a fresh norm only rescales.

# %%
#| export
class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension (arXiv 1910.07467).

    y = x / sqrt(mean(x**2) + eps) * weight, computed in float32 (float64 for a float64 input)
    and returned in x's dtype. `weight` is the learned gain g, initialised to ones. There is no
    bias and no mean subtraction. x: [..., dim] -> [..., dim].
    """

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        require_int("dim", dim, 1)
        self.dim, self.eps = dim, require_number("eps", eps, 0, low_open=True)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            _check_floating(x)
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension dim={self.dim}, "
                             f"got shape {list(x.shape)}")
        wide = x.to(torch.promote_types(x.dtype, torch.float32))   # float32, or float64 as given
        y = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.to(wide.dtype)).to(x.dtype)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"

# %% [markdown]
# The module must agree with the hand computation. It must also keep a bfloat16 input in
# bfloat16:

# %%
norm = RMSNorm(8)
with torch.no_grad():
    norm.weight.copy_(g)
diff = (norm(x).double() - rmsnorm_by_hand(x, g)).abs().max().item()
print(norm)
print(f"max |RMSNorm - by hand| = {diff:.1e}")
print("bfloat16 in ->", norm(x.bfloat16()).dtype, "out")

# %% [markdown]
# These checks become tests. A test cell runs here, and the same functions are written to
# `tests/test_01_weight_tied_block.py` for pytest. Each test seeds its own generator.

# %% [markdown]
# The first test compares the module with a float64 reference, written again from the
# formula so that it shares no code with the module:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
import pytest
import torch
import torch.nn.functional as F


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


run_tests(test_rmsnorm_matches_float64_reference, test_rmsnorm_eps_on_small_and_zero_rows)

# %% [markdown]
# The second feeds it float16 values near 300. Their squares overflow float16, so only a
# float32 computation gets them right:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def test_rmsnorm_low_precision_input():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    x = 300 * torch.randn(2, 16)  # x**2 overflows float16: the sum must be taken in float32
    for dtype in (torch.float16, torch.bfloat16):
        y = norm(x.to(dtype))
        assert y.dtype == dtype and y.shape == x.shape
        expected = _rmsnorm_float64(x.to(dtype), norm.weight, 1e-6)
        torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)


run_tests(test_rmsnorm_low_precision_input)

# %% [markdown]
# ## 1.3 Rotary position embeddings
#
# Attention by itself is blind to order. Shuffle the keys and values together and each
# query's output stays the same. The model needs some other way to know where each token
# sits. **Rotary position embeddings** (RoPE), from RoFormer {cite:p}`su2021roformer`, do it
# by rotating the queries and keys. Nothing is added to the token vectors.

# %% [markdown]
# Split a head's vector $x \in \mathbb{R}^{h_s}$ ($h_s$ is the head size, which must be
# even) into $h_s/2$ pairs. Pair $i$ gets the frequency
#
# $$\theta_i = b^{-2i/h_s}, \qquad i = 0, 1, \dots, h_s/2 - 1, \qquad b = 10000 .$$
#
# At position $m$, pair $i$ is rotated by the angle $m\,\theta_i$. Low $i$ turns fast with
# position, high $i$ slowly: a spread of clock hands.

# %% [markdown]
# The first step is the table of $\cos(m\theta_i)$ and $\sin(m\theta_i)$ for every
# position up to some `max_seq_len`. We compute the angles in float64 so that large
# positions keep their precision, then store the tables in float32 (or in the dtype asked
# for: a float64 model gets float64 tables).

# %%
#| export
def rope_angles(head_dim, max_seq_len, base=10000.0, dtype=torch.float32, device=None):
    """Cosine and sine tables for rotary position embeddings (RoFormer, arXiv 2104.09864).

    Position m and pair i (0 <= i < head_dim // 2) get the angle m * base**(-2i / head_dim).
    Returns (cos, sin), each of shape [max_seq_len, head_dim // 2] in `dtype` (float32 by
    default). The angles are computed in float64 so that large positions keep their precision.
    """
    require_int("head_dim", head_dim, 1)
    require_int("max_seq_len", max_seq_len, 1)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    require_number("base", base, 1, low_open=True)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    positions = torch.arange(max_seq_len, dtype=torch.float64, device=device)           # (T,)
    angles = torch.outer(positions, inv_freq)                                           # (T, hs/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)

# %%
cos, sin = rope_angles(head_dim=16, max_seq_len=64)
print("cos", tuple(cos.shape), "sin", tuple(sin.shape))
print("position 0 is no rotation:", bool((cos[0] == 1).all() and (sin[0] == 0).all()))

# %% [markdown]
# With `head_dim = 16` there are 8 pairs. Pair 0 turns by one radian per position. Pair 7
# turns by $10000^{-14/16} \approx 3 \times 10^{-4}$ radians, so it needs about 20,000
# positions to make a full turn.

# %% [markdown]
# Each column of the table is one pair's clock. The figure draws the cosine table with one
# row per pair and position along the horizontal axis:

# %%
fig, ax = plt.subplots(figsize=(7, 2.6))
ax.imshow(cos.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
ax.set_xlabel("position m")
ax.set_ylabel("pair i")
ax.set_title(r"$\cos(m\,\theta_i)$, head_dim = 16")
plt.show()

# %% [markdown]
# **Which coordinates form a pair.** The RoFormer paper pairs neighbours:
# $(x_0, x_1), (x_2, x_3), \dots$ (the "interleaved" layout). We use the other common layout,
# "rotate half" (GPT-NeoX {cite:p}`black2022gptneox` and the Hugging Face Llama code use it).
# It pairs coordinate $i$ with coordinate $i + h_s/2$.

# %% [markdown]
# The rotate-half formula, for $0 \le i < h_s/2$:
#
# $$
# \begin{aligned}
# x'_i &= x_i \cos(m\theta_i) - x_{i+h_s/2} \sin(m\theta_i), \\
# x'_{i+h_s/2} &= x_i \sin(m\theta_i) + x_{i+h_s/2} \cos(m\theta_i).
# \end{aligned}
# $$

# %% [markdown]
# The two layouts differ only by a fixed permutation of a head's coordinates, and the
# learned query and key projections absorb it. They are not interchangeable for one set of
# trained weights, though.

# %% [markdown]
# `apply_rope` checks its tables first. They must have one row per position of `x`, and
# the check below says which way they are off when they do not:

# %%
#| export
def _check_rope_tables(x, cos, sin):
    """Raise unless cos and sin are [T, head_dim // 2] (or [B, T, head_dim // 2], one table per
    row) for x [B, n_heads, T, head_dim]."""
    _check_floating(x)
    if x.ndim != 4:
        raise ValueError(f"x must have shape [B, n_heads, T, head_dim], got {list(x.shape)}")
    T, hs = x.shape[-2:]
    if hs % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {hs}")
    for name, table in (("cos", cos), ("sin", sin)):
        per_row = table.ndim == 3 and table.shape[0] == x.shape[0]
        if table.ndim not in (2, 3) or table.shape[-1] != hs // 2 or (table.ndim == 3 and not per_row):
            raise ValueError(f"{name} must have shape [T, head_dim // 2 = {hs // 2}] (or [B = {x.shape[0]}, "
                             f"T, {hs // 2}]), got {list(table.shape)}")
        table = table[0] if per_row else table
        if table.shape[0] < T:
            raise ValueError(f"{name} covers {table.shape[0]} positions but x has T={T}: the "
                             f"sequence is longer than the rope tables (build them with "
                             f"max_seq_len >= {T})")
        if table.shape[0] > T:
            raise ValueError(f"{name} has {table.shape[0]} rows but x has T={T}: pass the rows for "
                             f"x's positions, e.g. {name}[start:start + T]")


def _rope_tables_fit(x, cos, sin):
    """The cheap test apply_rope runs on every call; _check_rope_tables explains a failure."""
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 4
            and isinstance(cos, torch.Tensor) and cos.ndim in (2, 3) and sin.shape == cos.shape
            and cos.shape[-2] == x.shape[-2] and 2 * cos.shape[-1] == x.shape[-1]
            and (cos.ndim == 2 or cos.shape[0] == x.shape[0]))

# %% [markdown]
# The rotation itself works on two contiguous halves, with no strided indexing, so it is
# four lines:

# %%
#| export
def apply_rope(x, cos, sin):
    """Rotate each pair (x[..., i], x[..., i + head_dim/2]) by its angle ("rotate half" layout).

    x: [B, n_heads, T, head_dim]. cos, sin: [T, head_dim // 2], the table rows for the T
    positions of x. Slice the tables yourself, e.g. cos[start:start + T] when a KV cache holds
    the earlier positions. When the rows of a batch sit at different positions, pass one table
    per row, [B, T, head_dim // 2]. Returns a tensor of x's shape and dtype.
    """
    if not _rope_tables_fit(x, cos, sin):
        _check_rope_tables(x, cos, sin)                # raises, saying what is wrong
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]          # (B, nh, T, hs/2) each
    if cos.ndim == 3:                              # one table per row: (B, 1, T, hs/2)
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)    # broadcast over B (unless per row) and nh
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

# %% [markdown]
# First check: a rotation preserves length, so every head vector keeps its norm. Second
# check: position 0 is the identity.

# %%
q = torch.randn(2, 4, 64, 16)  # (B, nh, T, hs)
q_rot = apply_rope(q, cos, sin)
print(f"max change in vector norm: {(q_rot.norm(dim=-1) - q.norm(dim=-1)).abs().max():.1e}")
print("position 0 unchanged:", torch.equal(q_rot[:, :, 0], q[:, :, 0]))

# %% [markdown]
# The norms agree to float32 rounding. RoPE changes only the angles between queries and
# keys, never their lengths.

# %% [markdown]
# ### The relative-position property

# %% [markdown]
# Why rotations? Write $R_m$ for the rotation at position $m$. It is orthogonal, and
# rotations about the same planes compose by adding their angles, so
# $R_m^\top R_n = R_{n-m}$. The score between a query at position $m$ and a key at
# position $n$ is then
#
# $$\langle R_m q,\; R_n k \rangle = q^\top R_m^\top R_n\, k = q^\top R_{n-m}\, k ,$$
#
# which depends on the positions only through their offset $m - n$. Attention scores see
# *relative* positions, even though each token was rotated by its *absolute* position.

# %% [markdown]
# We can check this numerically. Fix one query vector and one key vector, place them at
# different pairs of positions, and compute the score:

# %%
def rope_score(q_vec, k_vec, m, n):
    """<R_m q, R_n k> for single head vectors q_vec, k_vec of size hs."""
    qm = apply_rope(q_vec.view(1, 1, 1, -1), cos[m : m + 1], sin[m : m + 1])
    kn = apply_rope(k_vec.view(1, 1, 1, -1), cos[n : n + 1], sin[n : n + 1])
    return (qm * kn).sum().item()

q_vec, k_vec = torch.randn(16), torch.randn(16)
for m, n in [(3, 0), (10, 7), (40, 37), (7, 10), (0, 3), (37, 40)]:
    print(f"m={m:2d} n={n:2d}  m-n={m - n:+d}  score={rope_score(q_vec, k_vec, m, n):+.5f}")

# %% [markdown]
# The score is the same for every pair with the same offset, and it changes when the offset
# changes sign. A query three places after a key scores it the same way anywhere in the
# sequence.

# %% [markdown]
# Now the checks become tests. The first compares against an independent formulation: a
# rotation of a pair is a multiplication by $e^{\mathrm{i}\, m \theta}$ in the complex
# plane, with $x_i$ as the real part and $x_{i+h_s/2}$ as the imaginary part.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_rope_matches_complex_rotation)

# %% [markdown]
# The other two pin the two properties we just saw: lengths are kept, and scores depend on
# the offset alone.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def test_rope_preserves_norm():
    torch.manual_seed(0)
    cos, sin = rope_angles(32, 50)
    x = torch.randn(3, 2, 50, 32)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


run_tests(test_rope_preserves_norm)

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_rope_scores_depend_only_on_offset)

# %% [markdown]
# When the rows of a batch sit at different positions (prompts of different lengths, chapter
# 6), `apply_rope` takes one table per row, $[B, T, h_s/2]$. Row by row it must equal the
# shared-table version:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_rope_per_row_tables_match_row_by_row)

# %% [markdown]
# ### Keeping the tables

# %% [markdown]
# A model builds its tables once and reuses them. A looped model uses the same positions at
# every loop step: token $m$ is still at position $m$ on the fourth pass through the block.
# So one pair of tables serves every application of the block. `RotaryEmbedding` holds the
# tables as buffers. Buffers move with `.to(device)`, and these ones are non-persistent, so
# they are not saved in a checkpoint. A change of dtype (`model.double()`, `model.half()`)
# recomputes them from the float64 angles rather than widening or rounding the stored
# float32 values, so a float64 model gets tables exact to float64. The module hands out the
# rows a call needs. Asking for positions past the end of the tables is an error, not a
# silent truncation.

# %%
#| export
class RotaryEmbedding(nn.Module):
    """The rope tables for positions 0 .. max_seq_len - 1, as non-persistent buffers.

    rope = RotaryEmbedding(head_dim, max_seq_len); cos, sin = rope(T) gives the rows for
    positions 0..T-1, and rope(T, start=s) those for s..s+T-1 (s > 0 when a KV cache already
    holds s positions). Each table is [T, head_dim // 2]; pass both to apply_rope or a Block.
    """

    def __init__(self, head_dim, max_seq_len, base=10000.0):
        super().__init__()
        cos, sin = rope_angles(head_dim, max_seq_len, base)
        self.head_dim, self.max_seq_len, self.base = head_dim, max_seq_len, float(base)
        self.register_buffer("cos", cos, persistent=False)  # (max_seq_len, hs/2)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(), .double(), .half() and .cuda() cast buffers; recompute the tables in the new
        # dtype and on the new device from float64 angles instead of keeping rounded values
        super()._apply(fn, recurse)
        self.cos, self.sin = rope_angles(self.head_dim, self.max_seq_len, self.base,
                                         self.cos.dtype, self.cos.device)
        return self

    def forward(self, seq_len, start=0):
        require_int("seq_len", seq_len, 1)
        require_int("start", start, 0)
        if start + seq_len > self.max_seq_len:
            raise ValueError(f"positions {start}..{start + seq_len - 1} do not fit the rope tables "
                             f"(max_seq_len={self.max_seq_len}): the sequence is too long")
        return self.cos[start : start + seq_len], self.sin[start : start + seq_len]

    def extra_repr(self):
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, base={self.base:g}"

# %%
rope = RotaryEmbedding(head_dim=16, max_seq_len=64)
cos5, sin5 = rope(5, start=10)
print(rope)
print("rows for positions 10..14:", tuple(cos5.shape), torch.equal(cos5, cos[10:15]))
print("state_dict keys:", list(rope.state_dict()))

# %% [markdown]
# The rows for positions 10 to 14 are the same rows as in the full table, and the
# `state_dict` is empty: a checkpoint stores weights, and the tables are not weights.
# Converted to float64, the module holds the float64 tables, not widened float32 ones:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def test_rope_tables_follow_the_dtype():
    rope = RotaryEmbedding(head_dim=16, max_seq_len=300).double()
    cos64, sin64 = rope_angles(16, 300, dtype=torch.float64)
    assert rope.cos.dtype == torch.float64
    assert torch.equal(rope.cos, cos64) and torch.equal(rope.sin, sin64)
    assert not torch.equal(rope.cos, cos64.float().double())   # more than float32's digits
    rope = rope.float()
    assert rope.cos.dtype == torch.float32 and torch.equal(rope.cos, rope_angles(16, 300)[0])


run_tests(test_rope_tables_follow_the_dtype)

# %% [markdown]
# ## 1.4 Causal self-attention
#
# Scaled dot-product attention {cite:p}`vaswani2017attention` mixes information across
# positions. For a single head with queries $Q$, keys $K$ and values $V$, each of shape
# $[T, h_s]$:
#
# $$\mathrm{Attn}(Q, K, V) = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{h_s}} + M\right) V .$$

# %% [markdown]
# A language model predicts token $t+1$ from tokens $0..t$, so position $i$ must not see
# positions $j > i$. The **causal mask** $M$ does that. It is $0$ where $j \le i$ and
# $-\infty$ where $j > i$. Adding $-\infty$ to a score gives it a softmax weight of exactly
# $e^{-\infty} = 0$. Here is the mask, built by hand:

# %%
T = 5
M = torch.zeros(T, T)
for i in range(T):
    for j in range(T):
        if j > i:
            M[i, j] = float("-inf")
print(M)

# %% [markdown]
# Row $i$ is query $i$, column $j$ is key $j$. Query 0 sees only key 0, and the last query
# sees every key.

# %% [markdown]
# Later chapters add a KV cache. Then a call may bring only the last $T_q$ queries, while
# the keys cover all $T_k \ge T_q$ positions. Query $i$ then sits at position
# $i + (T_k - T_q)$, and it may see keys $j \le i + (T_k - T_q)$. `causal_mask` builds this
# general mask as an upper triangle of $-\infty$ shifted by $T_k - T_q$. For $T_q = T_k$ it
# is the mask above.

# %%
#| export
def causal_mask(t_q, t_k, device=None, dtype=torch.float32):
    """Additive causal mask [t_q, t_k]: 0 where query i may see key j, -inf elsewhere.

    The t_q queries are the last t_q of the t_k positions (t_q <= t_k), so query i sees keys
    j <= i + (t_k - t_q). With t_q == t_k this is the usual lower-triangular mask.
    """
    require_int("t_q", t_q, 1)
    require_int("t_k", t_k, 1)
    if t_q > t_k:
        raise ValueError(f"t_q={t_q} queries need at least as many keys, got t_k={t_k}")
    mask = torch.full((t_q, t_k), float("-inf"), device=device, dtype=dtype)
    return mask.triu(diagonal=t_k - t_q + 1)

# %%
print("by hand:", torch.equal(causal_mask(5, 5), M))
print(causal_mask(2, 5))

# %% [markdown]
# With 2 queries and 5 keys, the queries sit at positions 3 and 4. The first sees keys 0–3,
# the second sees all five.

# %% [markdown]
# With the mask, the reference attention is the formula above, line for line. It works on
# a whole batch of heads at once: tensors of shape `(B, nh, T, hs)`, with `nh` heads of size
# `hs`. It builds the full $T_q \times T_k$ score matrix, so it is for checking, not for
# training.

# %%
#| export
def attention_reference(q, k, v, causal=True):
    """softmax(q kᵀ / sqrt(hs) + mask) v, written out. For checking, not for speed.

    q: [B, nh, Tq, hs]; k, v: [B, nh, Tk, hs]. With causal=True the queries are the last Tq of
    the Tk positions (see causal_mask). Returns [B, nh, Tq, hs].
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, Tq, Tk)
    if causal:
        scores = scores + causal_mask(q.shape[-2], k.shape[-2], q.device, scores.dtype)
    return scores.softmax(dim=-1) @ v                            # (B, nh, Tq, hs)

# %% [markdown]
# PyTorch ships the same operation as one fused call, `F.scaled_dot_product_attention`.
# It never stores the full score matrix, and it picks a fast kernel for the hardware. With
# `is_causal=True` it applies the causal mask itself. The two should agree:

# %%
q, k, v = torch.randn(3, 2, 4, 12, 16).unbind(0)  # each (B=2, nh=4, T=12, hs=16)
ours = attention_reference(q, k, v)
fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
print(f"max |reference - SDPA| = {(ours - fused).abs().max():.1e}")

# %% [markdown]
# They agree to float32 rounding: the fused kernel adds up the same terms in another order.

# %% [markdown]
# One caution for the KV-cache chapter: with `is_causal=True`, PyTorch aligns the mask to
# the *top-left* corner. That agrees with `causal_mask` only when $T_q = T_k$. For a
# single new query we pass our own mask instead:

# %%
last = F.scaled_dot_product_attention(q[:, :, -1:], k, v, attn_mask=causal_mask(1, 12))
wrong = F.scaled_dot_product_attention(q[:, :, -1:], k, v, is_causal=True)
full_last = fused[:, :, -1:]
print(f"causal_mask(1, 12): max diff from the full last row = {(last - full_last).abs().max():.1e}")
print(f"is_causal=True:     max diff from the full last row = {(wrong - full_last).abs().max():.1e}")

# %% [markdown]
# ### The attention layer

# %% [markdown]
# The layer wraps the operation in projections:
#
# 1. one linear map produces $q, k, v$ from $x$ (three $d \times d$ matrices stacked into
#    one, without biases);
# 2. split into `n_heads` heads of size `head_dim = d_model / n_heads`;
# 3. rotate $q$ and $k$ with RoPE (not $v$: the rotation is there to make the *scores*
#    depend on relative position);
# 4. causal attention in every head;
# 5. merge the heads, then one more $d \times d$ projection.

# %% [markdown]
# Steps 1–3 live in their own method, `project_qkv`, and step 5 in `project_out`. A later
# chapter adds a KV cache between them. It stores $k$ and $v$ after the rotation, and then
# it must call step 4 itself. Chapter 8 builds two variants that published models use, as a
# subclass: fewer key/value heads than query heads (grouped-query attention, which shrinks
# that cache), and a learned bias on $q$ and $k$ (Huginn). `Block` takes such a module as
# its `attn` argument.

# %% [markdown]
# The head count must divide the width, and each head's size must be even for RoPE. One
# function checks both; the block reuses it.

# %%
#| export
def _check_heads(d_model, n_heads):
    require_int("d_model", d_model, 1)
    require_int("n_heads", n_heads, 1)
    if d_model % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
    if (d_model // n_heads) % 2:
        raise ValueError(f"head_dim = d_model // n_heads = {d_model // n_heads} must be even for "
                         f"rotary embeddings (d_model={d_model}, n_heads={n_heads})")

# %% [markdown]
# The layer itself, with the five steps in three methods:

# %%
#| export
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary embeddings and no biases.

    forward(x [B, T, d_model], cos, sin) -> [B, T, d_model], where cos, sin are the rope rows
    [T, head_dim // 2] for x's positions (see RotaryEmbedding). The steps are exposed for a
    KV cache: project_qkv (projection, heads, rope), the attention op, project_out.
    """

    def __init__(self, d_model, n_heads):
        super().__init__()
        _check_heads(d_model, n_heads)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)  # W_q, W_k, W_v stacked
        self.proj = nn.Linear(d_model, d_model, bias=False)     # W_o

    def project_qkv(self, x, cos, sin):
        """x [B, T, C] -> q, k, v, each [B, nh, T, hs], with rope applied to q and k."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)                       # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v  # (B, nh, T, hs) each

    def project_out(self, y):
        """Merge the heads of y [B, nh, T, hs] and project: -> [B, T, C]."""
        B, nh, T, hs = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hs))

    def forward(self, x, cos, sin, attend=None):
        """attend(q, k, v) -> [B, nh, T, hs] replaces the causal attention op (a KV cache passes
        one, chapter 7); by default it is scaled_dot_product_attention(is_causal=True)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.d_model or not x.is_floating_point():
            _check_hidden(x, self.d_model)             # says what is wrong
        q, k, v = self.project_qkv(x, cos, sin)
        if attend is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        else:
            y = attend(q, k, v)
        return self.project_out(y)

# %%
_ = torch.manual_seed(0)
attn = CausalSelfAttention(d_model=64, n_heads=4)
rope = RotaryEmbedding(head_dim=attn.head_dim, max_seq_len=32)
x = torch.randn(2, 12, 64)  # (B, T, C)
cos, sin = rope(12)
print(attn)
print("x", tuple(x.shape), "-> attn(x)", tuple(attn(x, cos, sin).shape))

# %% [markdown]
# Two weight matrices, `qkv` with $3d \times d$ entries and `proj` with $d \times d$, and
# the output has the input's shape, as a residual add needs.

# %% [markdown]
# The layer calls the fused kernel. Building it from `project_qkv`, `attention_reference`
# and `project_out` must give the same output:

# %%
q, k, v = attn.project_qkv(x, cos, sin)
by_parts = attn.project_out(attention_reference(q, k, v))
print(f"max |layer - by parts| = {(attn(x, cos, sin) - by_parts).abs().max():.1e}")

# %% [markdown]
# What does the layer attend to? The attention weights are the softmax in the formula, one
# $T \times T$ matrix per head.

# %% [markdown]
# Everything above the diagonal is exactly zero, because those are the future positions.
# A freshly initialised layer has small scores, so each query spreads its weight almost
# evenly over the positions it may see: row $i$ is close to $1/(i+1)$. Training is what
# makes the patterns sharp.

# %%
with torch.no_grad():
    weights = (q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim) + causal_mask(12, 12)).softmax(-1)
fig, axes = plt.subplots(1, 4, figsize=(11, 3), sharey=True)
for h, ax in enumerate(axes):
    im = ax.imshow(weights[0, h], cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"head {h}")
    ax.set_xlabel("key position j")
    ax.set_xticks(range(0, 12, 3))
    ax.set_yticks(range(0, 12, 3))
axes[0].set_ylabel("query position i")
fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight")
plt.show()

# %% [markdown]
# ### Causality, checked

# %% [markdown]
# The mask is there so that no output depends on a later input. We test exactly that:
# change the tokens from position 7 on, and every output before position 7 must stay the
# same, while the later outputs do change.

# %%
x2 = x.clone()
x2[:, 7:] = torch.randn(2, 5, 64)
with torch.no_grad():
    y1, y2 = attn(x, cos, sin), attn(x2, cos, sin)
print(f"positions 0..6: max change {(y1[:, :7] - y2[:, :7]).abs().max():.1e}")
print(f"positions 7..11: max change {(y1[:, 7:] - y2[:, 7:]).abs().max():.1e}")

# %% [markdown]
# The earlier outputs do not move at all, not even by rounding: their masked weights are
# exactly zero, so the new tokens enter their sums only as exact zeros.

# %% [markdown]
# Three tests follow. The first checks the reference against the fused kernel, with and
# without the mask:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def test_reference_attention_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 20, 16).unbind(0)
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention_reference(q, k, v), fused, rtol=1e-5, atol=1e-6)
    full = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention_reference(q, k, v, causal=False), full,
                               rtol=1e-5, atol=1e-6)


run_tests(test_reference_attention_matches_sdpa)

# %% [markdown]
# The second checks the alignment a KV cache relies on: the last three queries against all
# the keys give the last three rows of the full computation.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def test_causal_mask_aligns_queries_to_last_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 9, 8).unbind(0)
    full = attention_reference(q, k, v)
    torch.testing.assert_close(attention_reference(q[:, :, -3:], k, v), full[:, :, -3:])
    allowed = causal_mask(2, 5) == 0
    assert allowed.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


run_tests(test_causal_mask_aligns_queries_to_last_keys)

# %% [markdown]
# The third is the causality experiment above as a test. `_changes_only_from` is reused
# for the whole block in section 1.6.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_attention_is_causal)

# %% [markdown]
# ## 1.5 The SwiGLU MLP
#
# Attention moves information between positions. The MLP then transforms each position on
# its own. The classic transformer MLP is $W_2\,\mathrm{ReLU}(W_1 x)$ with a hidden size of
# $4d$. Shazeer's GLU variants {cite:p}`shazeer2020glu` replace it with a *gated* unit. One
# projection, passed through the SiLU (also called Swish, $\mathrm{silu}(z) = z\,\sigma(z)$),
# multiplies another projection element by element:
#
# $$\mathrm{SwiGLU}(x) = W_{\text{down}}\left(\mathrm{silu}(W_{\text{gate}}\, x) \odot W_{\text{up}}\, x\right).$$

# %% [markdown]
# That makes three matrices instead of two. To keep the parameter count of the classic
# MLP, the paper shrinks the hidden size by $2/3$: $3 \cdot d \cdot \tfrac{8d}{3} = 8d^2 = 2
# \cdot d \cdot 4d$. Our default hidden size is therefore $\tfrac{8}{3} d$, **rounded up to
# a multiple of 8**, which keeps the matrix shapes friendly to the hardware. Chapter 9 puts
# several of these side by side as experts, with a router choosing among them per token;
# `Block` takes such a module as its `mlp` argument.

# %%
#| export
def default_d_hidden(d_model, multiple_of=8):
    """The default SwiGLU hidden size: 8/3 * d_model rounded up to a multiple of `multiple_of`.

    Three d x (8d/3) matrices hold 8 d² parameters, as many as a classic 4d-wide two-matrix MLP
    (arXiv 2002.05202).
    """
    require_int("d_model", d_model, 1)
    require_int("multiple_of", multiple_of, 1)
    return multiple_of * -(-8 * d_model // (3 * multiple_of))  # integer ceiling division

# %%
for d in (64, 128, 768, 2048):
    print(f"d_model={d:5d}  8d/3={8 * d / 3:8.1f}  default_d_hidden={default_d_hidden(d)}")

# %% [markdown]
# For $d = 768$ the rule gives 2048, the hidden size the GLU-variants paper used for its
# T5-base-sized models. Now the module, one line of forward pass:

# %%
#| export
class SwiGLU(nn.Module):
    """Gated MLP without biases: W_down(silu(W_gate x) * W_up x) (arXiv 2002.05202).

    x: [..., d_model] -> [..., d_model]. d_hidden defaults to default_d_hidden(d_model).
    """

    def __init__(self, d_model, d_hidden=None):
        super().__init__()
        d_hidden = default_d_hidden(d_model) if d_hidden is None else d_hidden
        require_int("d_model", d_model, 1)
        require_int("d_hidden", d_hidden, 1)
        self.gate = nn.Linear(d_model, d_hidden, bias=False)
        self.up = nn.Linear(d_model, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))  # (..., d_hidden) -> (..., d_model)

# %% [markdown]
# We check it against the formula, written with explicit matrix products and
# $\mathrm{silu}(z) = z\,\sigma(z)$:

# %%
mlp = SwiGLU(64)
h = torch.randn(2, 12, 64)
z = h @ mlp.gate.weight.T
by_formula = (z * torch.sigmoid(z) * (h @ mlp.up.weight.T)) @ mlp.down.weight.T
print(mlp)
print(f"max |SwiGLU - formula| = {(mlp(h) - by_formula).abs().max():.1e}")

# %% [markdown]
# All the pieces are ready.

# %% [markdown]
# ## 1.6 The block, and where its norms go
#
# A block is one attention layer and one MLP, each wrapped in a residual connection. Where
# the RMSNorms sit is a design choice, and for a looped model it matters a great deal,
# because the block's output becomes its own next input. We implement three placements,
# writing $n_1, \dots, n_4$ for separate RMSNorms with their own gains.

# %% [markdown]
# **`"pre"`**, the pre-norm arrangement of GPT-2 {cite:p}`radford2019gpt2` and Llama
# {cite:p}`touvron2023llama`. It normalises the input of each sub-layer and leaves the residual
# stream $h$ untouched:
#
# $$h \leftarrow h + \mathrm{Attn}(n_1(h)), \qquad h \leftarrow h + \mathrm{MLP}(n_2(h)).$$

# %% [markdown]
# **`"sandwich"`**, as in Ouro's model code {cite:p}`ouro-model-card,ouro-modeling-code`. It also
# normalises each sub-layer's *output* before adding it to the stream (the paper's text mentions
# only the RMSNorm before attention and the FFN; the four norms per layer are in the code):
#
# $$h \leftarrow h + n_2(\mathrm{Attn}(n_1(h))), \qquad h \leftarrow h + n_4(\mathrm{MLP}(n_3(h))).$$

# %% [markdown]
# **`"huginn"`**, Huginn's sandwich. It normalises *after* each residual add, so the stream
# itself is renormalised twice per block. The Huginn paper {cite:p}`geiping2025huginn` found
# this placement necessary to train its recurrence at scale:
#
# $$\hat h = n_2(h + \mathrm{Attn}(n_1(h))), \qquad h \leftarrow n_4(\hat h + \mathrm{MLP}(n_3(\hat h))).$$

# %% [markdown]
# The argument `norm_style` picks one of the three. A small function validates all of the
# block's arguments; `block_param_count` in section 1.7 reuses it.

# %%
#| export
NORM_STYLES = ("pre", "sandwich", "huginn")


def _check_block_args(d_model, n_heads, d_hidden, norm_style):
    """Validate Block's arguments; return d_hidden with its default filled in."""
    _check_heads(d_model, n_heads)
    d_hidden = default_d_hidden(d_model) if d_hidden is None else d_hidden
    require_int("d_hidden", d_hidden, 1)
    if not isinstance(norm_style, str) or norm_style not in NORM_STYLES:
        allowed = ", ".join(repr(s) for s in NORM_STYLES)
        raise ValueError(f"norm_style must be one of {allowed}; got {norm_style!r}")
    return d_hidden

# %% [markdown]
# The forward pass has one branch per equation, in the same notation: `n1, n2, n3, n4` are
# $n_1, \dots, n_4$.

# %%
#| export
class Block(nn.Module):
    """A transformer block: causal self-attention and a SwiGLU MLP with residual adds.

    norm_style places the RMSNorms n1..n4 (`self.norms`, in that order):
      "pre":       h = h + Attn(n1(h));       h = h + MLP(n2(h))
      "sandwich":  h = h + n2(Attn(n1(h)));   h = h + n4(MLP(n3(h)))    (Ouro's code)
      "huginn":    h = n2(h + Attn(n1(h)));   h = n4(h + MLP(n3(h)))    (Huginn)
    forward(x [B, T, d_model], cos, sin) -> [B, T, d_model]; cos, sin are the rope rows
    [T, head_dim // 2] for x's positions. d_hidden defaults to default_d_hidden(d_model).
    attn: the attention module (default CausalSelfAttention(d_model, n_heads)); chapter 8
    passes grouped-query attention. mlp: the feed-forward (default SwiGLU(d_model, d_hidden));
    chapter 9 passes a mixture of experts.
    """

    def __init__(self, d_model, n_heads, d_hidden=None, norm_style="pre", eps=1e-6, attn=None, mlp=None):
        super().__init__()
        d_hidden = _check_block_args(d_model, n_heads, d_hidden, norm_style)
        self.d_model, self.n_heads, self.d_hidden = d_model, n_heads, d_hidden
        self.norm_style = norm_style
        n_norms = 2 if norm_style == "pre" else 4
        self.norms = nn.ModuleList(RMSNorm(d_model, eps) for _ in range(n_norms))
        self.attn = CausalSelfAttention(d_model, n_heads) if attn is None else attn
        self.mlp = SwiGLU(d_model, d_hidden) if mlp is None else mlp

    def forward(self, x, cos, sin, attend=None):
        """attend: passed to the attention (None: causal attention over x itself)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.d_model or not x.is_floating_point():
            _check_hidden(x, self.d_model)             # says what is wrong
        if self.norm_style == "pre":
            n1, n2 = self.norms
            x = x + self.attn(n1(x), cos, sin, attend)
            x = x + self.mlp(n2(x))
        elif self.norm_style == "sandwich":
            n1, n2, n3, n4 = self.norms
            x = x + n2(self.attn(n1(x), cos, sin, attend))
            x = x + n4(self.mlp(n3(x)))
        else:  # "huginn"
            n1, n2, n3, n4 = self.norms
            x = n2(x + self.attn(n1(x), cos, sin, attend))
            x = n4(x + self.mlp(n3(x)))
        return x

# %%
_ = torch.manual_seed(0)
block = Block(d_model=64, n_heads=4, norm_style="sandwich")
print(block)

# %% [markdown]
# The attention op itself can be replaced: `attend(q, k, v)` receives the rotated queries and
# keys and the values, and returns what attention would. Chapter 7 passes a function that
# also reads and writes a KV cache. Passing plain causal attention must change nothing, in
# the block too, for every norm placement:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_attend_hook_replaces_the_attention_op)

# %% [markdown]
# Four norms, one attention layer, one MLP. A `"pre"` block has the same parts with two
# norms.

# %% [markdown]
# The norms are created before any weight matrix, and a fresh norm has no random state.
# So blocks built from the same seed share their attention and MLP weights whatever their
# `norm_style`, and only the norm placement differs between them. Each maps a
# `(B, T, C)` input to a `(B, T, C)` output:

# %% tags=["nbval-check-output"]
x = torch.randn(2, 12, 64)
cos, sin = RotaryEmbedding(head_dim=16, max_seq_len=32)(12)
blocks = {}
for style in NORM_STYLES:
    _ = torch.manual_seed(0)
    blocks[style] = Block(64, 4, norm_style=style)
    print(f"{style:9s} {tuple(x.shape)} -> {tuple(blocks[style](x, cos, sin).shape)}")
same = torch.equal(blocks["pre"].attn.qkv.weight, blocks["huginn"].attn.qkv.weight)
print("same attention weights:", same)

# %% [markdown]
# ### One block, applied again and again

# %% [markdown]
# Here is the whole idea of this book in two lines. A standard model of depth $L$ walks
# through $L$ different blocks. A looped model walks through **one** block $S$ times.
#
# ```python
# for block in blocks: h = block(h, cos, sin)     # standard: L blocks, L sets of weights
# for _ in range(S):   h = core(h, cos, sin)      # looped: one block, one set of weights
# ```

# %% [markdown]
# The same rope rows `cos, sin` are used on every pass, since the tokens do not move. What
# happens to the size of the hidden state when we feed a block its own output 32 times?
# We measure the root mean square of $h$ after each application, for the three norm
# placements. The blocks are untrained, with PyTorch's default initialisation.

# %%
def rms_per_application(block, h, n_applications, cos, sin):
    """Feed `block` its own output; return RMS(h) before and after each application."""
    rms = [h.pow(2).mean().sqrt().item()]
    with torch.no_grad():
        for _ in range(n_applications):
            h = block(h, cos, sin)
            rms.append(h.pow(2).mean().sqrt().item())
    return rms

# %% [markdown]
# Each block starts from the same input `x` and runs for 32 applications:

# %%
history = {style: rms_per_application(blocks[style], x, 32, cos, sin) for style in NORM_STYLES}
for style, rms in history.items():
    print(f"{style:9s} RMS after 1, 8, 32 applications: {rms[1]:7.2f} {rms[8]:7.2f} {rms[32]:7.2f}")

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.5))
for style, rms in history.items():
    ax.plot(range(len(rms)), rms, marker=".", label=style)
ax.set_yscale("log")
ax.set_xlabel("applications of the same block")
ax.set_ylabel("RMS of hidden state")
ax.set_title("One weight-tied block, applied to its own output")
ax.legend()
plt.show()

# %% [markdown]
# The three placements behave very differently:
#
# - **pre**: nothing normalises the stream itself. The sub-layers see a normalised copy of
#   $h$, so each update has a bounded size, and the updates keep adding up. Once $h$ settles
#   on a direction, its normalised copy stops changing, each application adds nearly the
#   same update, and the RMS grows about linearly.
# - **sandwich**: the updates themselves are normalised, to RMS 1 each with unit gains, and
#   there are two per application. They add about 1.4 to the RMS every time, so the stream
#   grows fastest.
# - **huginn**: the state is renormalised at the end of every application, so its RMS stays
#   at 1 however long we loop.

# %% [markdown]
# A looped model needs its state to stay in a range the block can handle on every pass.
# That is why Huginn normalises the stream itself, and why Ouro applies a final RMSNorm
# after every pass through its stack and feeds the normed state into the next pass. The
# next chapters build the looped model and make these choices explicit.

# %% [markdown]
# ### Tests for the block
#
# First, shapes: every module maps a `(B, T, C)` input to a `(B, T, C)` output, for all
# three norm styles.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_shapes)

# %% [markdown]
# Next, causality of the whole block. The MLP and the norms act on each position
# separately, so if attention is causal the block must be too.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def test_block_is_causal():
    for style in NORM_STYLES:
        torch.manual_seed(0)
        block = Block(32, 2, norm_style=style)
        cos, sin = RotaryEmbedding(16, 16)(16)
        before, after = _changes_only_from(lambda x: block(x, cos, sin), torch.randn(2, 16, 32), 5)
        assert before < 1e-5 and after > 1e-3, style


run_tests(test_block_is_causal)

# %% [markdown]
# Last, gradients. We apply one block three times to its own output, as a looped model
# will, and backpropagate. Every parameter must get a finite gradient.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_gradients_are_finite)

# %% [markdown]
# ## 1.7 Counting parameters
#
# We count a block's parameters from the formula and check the count against PyTorch. For
# model width $d$ and MLP hidden size $d_h$:

# %% [markdown]
# | part | matrices | parameters |
# |---|---|---|
# | attention | $W_q, W_k, W_v, W_o$, each $d \times d$ | $4d^2$ |
# | SwiGLU | $W_{\text{gate}}, W_{\text{up}}$ ($d_h \times d$), $W_{\text{down}}$ ($d \times d_h$) | $3\,d\,d_h$ |
# | RMSNorm gains | 2 (`"pre"`) or 4 (`"sandwich"`, `"huginn"`) vectors of size $d$ | $2d$ or $4d$ |

# %% [markdown]
# The number of heads does not change the count: the heads split the same matrices
# differently. There are no biases to count.

# %%
#| export
def block_param_count(d_model, n_heads, d_hidden=None, norm_style="pre"):
    """Parameters of Block(d_model, n_heads, d_hidden, norm_style), from the formula.

    4 d² (W_q, W_k, W_v, W_o) + 3 d d_hidden (SwiGLU) + n_norms d (RMSNorm gains), where
    n_norms is 2 for "pre" and 4 for "sandwich" and "huginn". n_heads does not change it.
    """
    d_hidden = _check_block_args(d_model, n_heads, d_hidden, norm_style)
    n_norms = 2 if norm_style == "pre" else 4
    return 4 * d_model**2 + 3 * d_model * d_hidden + n_norms * d_model

# %% [markdown]
# The formula against `sum(p.numel() for p in block.parameters())`, for four sizes and all
# three norm styles:

# %% tags=["nbval-check-output"]
configs = [(64, 4, None), (128, 4, None), (96, 6, 256), (256, 8, 1024)]
print(f"{'d_model':>7} {'n_heads':>7} {'d_hidden':>8} {'norm_style':>10} {'formula':>9} {'PyTorch':>9}")
for d_model, n_heads, d_hidden in configs:
    for style in NORM_STYLES:
        formula = block_param_count(d_model, n_heads, d_hidden, style)
        counted = sum(p.numel() for p in Block(d_model, n_heads, d_hidden, style).parameters())
        d_h = default_d_hidden(d_model) if d_hidden is None else d_hidden
        print(f"{d_model:7d} {n_heads:7d} {d_h:8d} {style:>10} {formula:9,d} {counted:9,d}")
        assert formula == counted

# %% [markdown]
# The counts match everywhere. Almost all parameters sit in the matrices; the norms add
# $2d$ more for the four-norm styles.

# %% [markdown]
# This is where weight tying pays. A standard 8-layer model of width 256 has 8 blocks. A
# looped model that runs one such block 8 times does the same matrix multiplications per
# token with an eighth of the block parameters:

# %% tags=["nbval-check-output"]
per_block = block_param_count(256, 8, norm_style="pre")
print(f"8 distinct blocks:        {8 * per_block:>9,d} parameters")
print(f"1 block applied 8 times:  {per_block:>9,d} parameters")

# %% [markdown]
# Whether the looped model is as good as the tall one for the same compute is the question
# the rest of the book explores. Ouro's authors report 2–3× parameter efficiency at the
# billion-parameter scale.

# %% [markdown]
# A test keeps the formula honest for a few more shapes, including an explicit `d_hidden`:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def test_param_count_formula():
    for d_model, n_heads, d_hidden in [(32, 2, None), (48, 4, 100), (64, 8, 64)]:
        for style in NORM_STYLES:
            block = Block(d_model, n_heads, d_hidden, norm_style=style)
            assert block_param_count(d_model, n_heads, d_hidden, style) == sum(
                p.numel() for p in block.parameters()), (d_model, style)
    assert block_param_count(64, 4, 176, "pre") == 4 * 64**2 + 3 * 64 * 176 + 2 * 64
    assert default_d_hidden(64) == 176 and default_d_hidden(768) == 2048


run_tests(test_param_count_formula)

# %% [markdown]
# ## 1.8 Bad input gets a clear error
#
# Here are a few mistakes that are easy to make, and the messages they produce. Each one
# names the argument and says what was expected.

# %%
def show_error(make):
    """Call make(); print the ValueError or TypeError it raises."""
    try:
        make()
    except (ValueError, TypeError) as e:
        print(f"{type(e).__name__}: {e}")
    else:
        print("no error")

# %% [markdown]
# First, constructor arguments: a head count that does not divide the width, an odd head
# dimension, an unknown norm style, a size of zero.

# %% tags=["nbval-check-output"]
show_error(lambda: Block(d_model=100, n_heads=3))
show_error(lambda: Block(d_model=36, n_heads=4))
show_error(lambda: Block(d_model=64, n_heads=4, norm_style="post"))
show_error(lambda: Block(d_model=0, n_heads=4))

# %% [markdown]
# Mistakes at call time get the same treatment. Examples are token ids passed where
# hidden states belong, the wrong width, a missing batch dimension, and a sequence longer
# than the rope tables:

# %% tags=["nbval-check-output"]
block = Block(64, 4)
rope = RotaryEmbedding(head_dim=16, max_seq_len=32)
cos, sin = rope(12)
show_error(lambda: block(torch.randint(0, 100, (2, 12)), cos, sin))
show_error(lambda: block(torch.randn(2, 12, 32), cos, sin))
show_error(lambda: block(torch.randn(12, 64), cos, sin))
show_error(lambda: rope(40))
show_error(lambda: block(torch.randn(2, 40, 64), cos, sin))

# %% [markdown]
# In the last two lines the rope tables are the problem. `rope(40)` refuses to hand out
# rows it does not have. The block, given 12 rows for 40 positions, says so too.

# %% [markdown]
# The tests pin down each message, so a change to the checks cannot quietly remove one.
# First the constructors:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="n_heads=3 must divide d_model=100"):
        Block(100, 3)
    with pytest.raises(ValueError, match="head_dim .* must be even"):
        CausalSelfAttention(36, 4)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_angles(15, 8)
    with pytest.raises(ValueError, match="norm_style must be one of 'pre', 'sandwich', 'huginn'"):
        Block(64, 4, norm_style="post")


run_tests(test_bad_arguments_raise)

# %% [markdown]
# Sizes must be positive ints. A float or a bool is refused, not rounded or read as 1:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_bad_sizes_raise)

# %% [markdown]
# Then the inputs:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_bad_inputs_raise)

# %% [markdown]
# And the rope tables and masks, which must match the sequence they are used with:

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_bad_positions_raise)

# %% [markdown]
# ## Summary
#
# `looplm/block.py` now holds the block that every later chapter loops:
#
# | name | what it is |
# |---|---|
# | `RMSNorm(dim, eps=1e-6)` | $x / \sqrt{\mathrm{mean}(x^2) + \epsilon} \odot g$, computed in float32 |
# | `rope_angles(head_dim, max_seq_len, base=10000.0)` | `(cos, sin)` tables, each `[max_seq_len, head_dim // 2]` |
# | `apply_rope(x, cos, sin)` | rotate-half RoPE on `x [B, nh, T, hs]` with the rows for its positions |
# | `RotaryEmbedding(head_dim, max_seq_len, base=10000.0)` | holds the tables; `rope(T, start=0)` gives the rows |
# | `causal_mask(t_q, t_k)` | additive mask, queries aligned to the last keys |
# | `attention_reference(q, k, v, causal=True)` | the attention formula written out, for checking |
# | `CausalSelfAttention(d_model, n_heads)` | `project_qkv` → attention → `project_out`, no biases |
# | `default_d_hidden(d_model, multiple_of=8)` | $\tfrac83 d$ rounded up to a multiple of 8 |
# | `SwiGLU(d_model, d_hidden=None)` | $W_{\text{down}}(\mathrm{silu}(W_{\text{gate}}x) \odot W_{\text{up}}x)$ |
# | `Block(d_model, n_heads, d_hidden=None, norm_style="pre", eps=1e-6)` | the block, `norm_style` in `NORM_STYLES` |
# | `block_param_count(d_model, n_heads, d_hidden=None, norm_style="pre")` | $4d^2 + 3 d d_h + (2 \text{ or } 4)d$ |
#
# Next, an embedding, a stack of these blocks and a final norm become a language model. One
# setting gives a standard GPT; another loops the stack.

# %% [markdown]
# ## Exercises
#
# Each exercise is a module in `exercises/ch01/` with a function body for you to write,
# plus a file of graded tests next to it. Open the module, read its docstring, and replace
# the `raise NotImplementedError(...)`. The reference solutions are in
# `exercises/solutions/ch01/`, to read after you have tried. Under each exercise are hints,
# folded away: open them one at a time, and only when you are stuck.

# %% [markdown]
# **Exercise 1.1: RMSNorm** (`ex1_rmsnorm.py`). Write `rms_norm(x, weight, eps)` as a
# function: the formula of section 1.2, computed in float32 and returned in the input's
# dtype. The tests compare against a float64 reference, and they feed it float16 values
# large enough that their squares overflow float16.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Convert first and convert back last: `x32 = x.float()` at the start, `.to(x.dtype)` on the
# result. Everything in between is float32, so no square can overflow.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# The mean square is over the last dimension only, and it must broadcast back against `x`:
# `x32.pow(2).mean(dim=-1, keepdim=True)` has shape `[..., 1]`. `eps` is added to it *before*
# the square root.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# `x32 * torch.rsqrt(ms + eps) * weight.float()`, where `torch.rsqrt` is $1/\sqrt{\cdot}$. An
# all-zero row gives $0 \cdot 1/\sqrt{\epsilon} = 0$, not NaN.
# ```

# %% [markdown]
# **Exercise 1.2: Rotary position embeddings** (`ex2_rope.py`). Write `rope_angles` and
# `apply_rope` in the rotate-half layout of section 1.3. The tests compare against rotation
# by complex numbers, and they check that norms are preserved and that scores depend only on
# $m - n$.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# `rope_angles`: the frequencies $\theta_i = \text{base}^{-2i/h_s}$ for $i = 0, \dots, h_s/2 - 1$
# are one vector; `torch.arange(0, head_dim, 2)` gives the values $2i$. Compute in float64 and
# cast the tables to float32 at the end, so that large positions keep their precision.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# The table of angles $m\,\theta_i$ is an outer product of the positions and the frequencies:
# `torch.outer(positions, inv_freq)`, shape `[max_seq_len, head_dim // 2]`; then `.cos()` and
# `.sin()`. For `apply_rope`, split `x` into halves `x1, x2 = x[..., :half], x[..., half:]`:
# pair $i$ is `(x1[..., i], x2[..., i])`, and `cos`, `sin` of shape `[T, hs/2]` broadcast against
# `[B, nh, T, hs/2]`.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# Rotating the point $(a, b)$ counterclockwise by $\alpha$ gives
# $(a\cos\alpha - b\sin\alpha,\; a\sin\alpha + b\cos\alpha)$, so the result is
# `torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)`, with the tables cast to
# `x.dtype` first.
# ```

# %% [markdown]
# **Exercise 1.3: Causal attention by hand** (`ex3_causal_attention.py`). Write
# `causal_mask(t_q, t_k)` and `causal_attention(q, k, v)` without calling
# `F.scaled_dot_product_attention`. The tests compare against it, including the case of a few
# queries against more keys that a KV cache creates.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Start with the mask. Query $i$ sits at position $i + (t_k - t_q)$ and may not see the keys
# $j > i + (t_k - t_q)$, that is $j - i > t_k - t_q$: the forbidden entries lie above a
# diagonal shifted $t_k - t_q$ to the right.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# `torch.triu(m, diagonal=k)` keeps the entries with $j - i \ge k$ and sets the others to zero.
# Start from a `[t_q, t_k]` matrix full of `float("-inf")` and pick `k` so that exactly the
# forbidden entries keep their $-\infty$.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# `causal_mask` is `torch.full((t_q, t_k), float("-inf")).triu(diagonal=t_k - t_q + 1)`. For the
# attention: `scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])`, shape
# `[B, nh, t_q, t_k]`; add the mask (it broadcasts); `scores.softmax(dim=-1) @ v`.
# ```

# %% [markdown]
# **Exercise 1.4: How RoPE forgets** (`ex4_rope_similarity.py`). Put the same vector $q$ at two
# positions, once as a query and once as a key. At equal positions its score is
# $\lVert q \rVert^2$; how much of that is left when the positions are $\Delta$ apart? Write
# `rope_similarity(offset, head_dim, base)`, the expected score at offset $\Delta$ relative to
# the score at offset 0, for $q$ with independent standard normal coordinates. Derive it, do
# not sample it. The tests measure it with the package's `rope_angles` and `apply_rope`,
# exactly over an orthonormal basis (within $10^{-5}$) and over 4,000 random vectors (within
# 0.02). How similar does a vector look to itself 100 positions back at head dimension 64?
# The RoFormer paper {cite:p}`su2021roformer` names a "decaying inter-token dependency
# with increasing relative distances" among RoPE's properties; this exercise measures that
# decay for a key whose content matches the query exactly.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Section 1.3's tests show that the score depends on $m$ and $n$ only through $m - n$, so
# compare $R_\Delta q$ with $q$ itself. RoPE rotates each pair $(q_i, q_{i + h_s/2})$ on its own,
# so the dot product is a sum of one term per pair.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# In the plane, the dot product of a vector $v$ with $v$ turned by an angle $\alpha$ is
# $\lVert v \rVert^2 \cos\alpha$. Pair $i$ is turned by $\Delta\,\theta_i$. What is the
# expected squared length of one pair, and of the whole of $q$?
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# For standard normal coordinates $\mathbb{E}[q_i^2 + q_{i+h_s/2}^2] = 2$ and
# $\mathbb{E}\lVert q \rVert^2 = h_s$, so the ratio is the mean over the $h_s/2$ pairs of
# $\cos(\Delta\,\theta_i)$, with $\theta_i = \text{base}^{-2i/h_s}$. Check it: 1 at offset 0, and the same for $\pm\Delta$.
# ```

# %% [markdown]
# The next cell grades your versions. Run it again whenever you like; every test fails
# until you write the code.

# %%
from looplm.grade import grade; grade("ch01")
