# Generated from book/01_weight_tied_block.py, book/08_real_models.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['RMSNorm', 'rope_angles', 'apply_rope', 'RotaryEmbedding', 'causal_mask', 'attention_reference', 'CausalSelfAttention', 'default_d_hidden', 'SwiGLU', 'NORM_STYLES', 'Block', 'block_param_count', 'repeat_kv', 'GroupedQueryAttention']
# fmt: on

import math

import torch
import torch.nn.functional as F
from torch import nn

from looplm.checks import require_int, require_number

# --- book/01_weight_tied_block.py:92 (cell 7) ---
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

# --- book/01_weight_tied_block.py:189 (cell 19) ---
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

# --- book/01_weight_tied_block.py:325 (cell 30) ---
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

# --- book/01_weight_tied_block.py:391 (cell 39) ---
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

# --- book/01_weight_tied_block.py:428 (cell 41) ---
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

# --- book/01_weight_tied_block.py:595 (cell 59) ---
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

# --- book/01_weight_tied_block.py:692 (cell 68) ---
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

# --- book/01_weight_tied_block.py:721 (cell 72) ---
def attention_reference(q, k, v, causal=True):
    """softmax(q kᵀ / sqrt(hs) + mask) v, written out. For checking, not for speed.

    q: [B, nh, Tq, hs]; k, v: [B, nh, Tk, hs]. With causal=True the queries are the last Tq of
    the Tk positions (see causal_mask). Returns [B, nh, Tq, hs].
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, Tq, Tk)
    if causal:
        scores = scores + causal_mask(q.shape[-2], k.shape[-2], q.device, scores.dtype)
    return scores.softmax(dim=-1) @ v                            # (B, nh, Tq, hs)

# --- book/01_weight_tied_block.py:786 (cell 82) ---
def _check_heads(d_model, n_heads):
    require_int("d_model", d_model, 1)
    require_int("n_heads", n_heads, 1)
    if d_model % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
    if (d_model // n_heads) % 2:
        raise ValueError(f"head_dim = d_model // n_heads = {d_model // n_heads} must be even for "
                         f"rotary embeddings (d_model={d_model}, n_heads={n_heads})")

# --- book/01_weight_tied_block.py:800 (cell 84) ---
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

# --- book/01_weight_tied_block.py:988 (cell 104) ---
def default_d_hidden(d_model, multiple_of=8):
    """The default SwiGLU hidden size: 8/3 * d_model rounded up to a multiple of `multiple_of`.

    Three d x (8d/3) matrices hold 8 d² parameters, as many as a classic 4d-wide two-matrix MLP
    (arXiv 2002.05202).
    """
    require_int("d_model", d_model, 1)
    require_int("multiple_of", multiple_of, 1)
    return multiple_of * -(-8 * d_model // (3 * multiple_of))  # integer ceiling division

# --- book/01_weight_tied_block.py:1008 (cell 107) ---
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

# --- book/01_weight_tied_block.py:1076 (cell 116) ---
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

# --- book/01_weight_tied_block.py:1095 (cell 118) ---
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

# --- book/01_weight_tied_block.py:1334 (cell 143) ---
def block_param_count(d_model, n_heads, d_hidden=None, norm_style="pre"):
    """Parameters of Block(d_model, n_heads, d_hidden, norm_style), from the formula.

    4 d² (W_q, W_k, W_v, W_o) + 3 d d_hidden (SwiGLU) + n_norms d (RMSNorm gains), where
    n_norms is 2 for "pre" and 4 for "sandwich" and "huginn". n_heads does not change it.
    """
    d_hidden = _check_block_args(d_model, n_heads, d_hidden, norm_style)
    n_norms = 2 if norm_style == "pre" else 4
    return 4 * d_model**2 + 3 * d_model * d_hidden + n_norms * d_model

# --- book/08_real_models.py:132 (cell 7) ---
def repeat_kv(x, n_rep):
    """[B, n_kv, T, hs] -> [B, n_kv * n_rep, T, hs]: key/value head j serves query heads
    j * n_rep .. (j + 1) * n_rep - 1 (each head repeated n_rep times in a row)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class GroupedQueryAttention(CausalSelfAttention):
    """Causal self-attention with n_kv_heads key/value heads, each shared by n_heads // n_kv_heads
    query heads (arXiv 2305.13245), and optionally a learned bias on q and k before rope (Huginn).

    qkv.weight is [(n_heads + 2 n_kv_heads) hs, d_model]: the rows of q, then k, then v, head
    after head. qk_bias is [2, n_heads, hs] (q's, then k's), zeros at first; it needs
    n_kv_heads == n_heads, as in Huginn. project_qkv returns k and v with n_kv_heads heads.
    """

    def __init__(self, d_model, n_heads, n_kv_heads=None, qk_bias=False):
        super().__init__(d_model, n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else require_int("n_kv_heads", n_kv_heads, 1, n_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        if qk_bias and n_kv_heads != n_heads:
            raise ValueError(f"qk_bias=True needs n_kv_heads == n_heads (as in Huginn), got "
                             f"n_kv_heads={n_kv_heads}, n_heads={n_heads}")
        self.n_kv_heads, self.kv_dim = n_kv_heads, n_kv_heads * self.head_dim
        self.qkv = nn.Linear(d_model, d_model + 2 * self.kv_dim, bias=False)     # W_q | W_k | W_v
        self.qk_bias = nn.Parameter(torch.zeros(2, n_heads, self.head_dim)) if qk_bias else None

    def project_qkv(self, x, cos, sin):
        """x [B, T, C] -> q [B, nh, T, hs] and k, v [B, n_kv_heads, T, hs], rope on q and k."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([C, self.kv_dim, self.kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)          # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2) for t in (k, v))
        if self.qk_bias is not None:                  # one bias vector per head, before the rotation
            q, k = q + self.qk_bias[0][:, None], k + self.qk_bias[1][:, None]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, attend=None):
        """As CausalSelfAttention; attend(q, k, v) gets k and v with n_kv_heads heads."""
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.d_model or not x.is_floating_point():
            _check_hidden(x, self.d_model)
        q, k, v = self.project_qkv(x, cos, sin)
        if attend is None:
            n_rep = self.n_heads // self.n_kv_heads
            y = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True)
        else:
            y = attend(q, k, v)
        return self.project_out(y)

    def extra_repr(self):
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, qk_bias={self.qk_bias is not None}"
