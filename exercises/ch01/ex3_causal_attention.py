"""Exercise 1.3: Causal attention by hand

Write the two pieces of section 1.4 of chapter 1 without calling
`torch.nn.functional.scaled_dot_product_attention` (the tests compare against it).

`causal_mask(t_q, t_k)` returns an additive float32 mask of shape [t_q, t_k]: 0.0 where query
i may see key j, and -inf elsewhere. The t_q queries are the LAST t_q of the t_k positions
(as when a KV cache holds the earlier keys), so query i sits at position i + (t_k - t_q) and
may see the keys j <= i + (t_k - t_q). For t_q == t_k this is the usual lower triangle.

`causal_attention(q, k, v)` is the scaled dot-product attention of section 1.4 for
q [B, nh, t_q, hs] and k, v [B, nh, t_k, hs]: every query scores every key by their dot product
divided by sqrt(hs), the mask above is added, a softmax over the keys turns the scores into
weights, and the result is the weighted sum of the values, [B, nh, t_q, hs].

Grade it with `python -m looplm.grade ch01`, or run
`pytest exercises/ch01/test_ex3_causal_attention.py`.
"""

import torch


def causal_mask(t_q: int, t_k: int) -> torch.Tensor:
    """Additive mask [t_q, t_k]: 0 where query i sees key j (j <= i + t_k - t_q), -inf elsewhere."""
    raise NotImplementedError("Exercise 1.3: write causal_mask")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hs) + causal_mask) v for q [B, nh, t_q, hs], k, v [B, nh, t_k, hs]."""
    raise NotImplementedError("Exercise 1.3: write causal_attention")
