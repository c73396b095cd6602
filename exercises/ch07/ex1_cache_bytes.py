"""Exercise 7.1: The bytes of each cache strategy

Write `cache_bytes(config, strategy, batch, prompt_len, n_new, n_steps=None, bytes_per_value=4)`:
the bytes of the KV cache that `looplm.generate` keeps for a LoopLM with this config, as laid
out in section 7.3 of chapter 7: `batch` prompts of `prompt_len` tokens, room for `n_new`
decoded tokens, S = n_steps loop steps (default config.n_loops), and `bytes_per_value` bytes
per stored number. The tests compare with `LoopKVCache(model, strategy, prompt_mask, n_new,
n_steps).nbytes()`, the bytes of the cache's tensors.

- One position's keys and values in one block take 2 * n_heads * head_dim values.
- strategy: "exact", "last", "first", "average" or "mod-K" (K >= 1).
- Raise ValueError for an unknown strategy name (also "mod-0" or "mod-x").

Do not call anything from `looplm.generate`: the point is to count. Grade it with
`python -m looplm.grade ch07`.
"""


def cache_bytes(config, strategy, batch, prompt_len, n_new, n_steps=None, bytes_per_value=4):
    """Bytes of the KV cache of generate(..., cache=strategy) for this config and these sizes."""
    raise NotImplementedError("Exercise 7.1: write cache_bytes")
