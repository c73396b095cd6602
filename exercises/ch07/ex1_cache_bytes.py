"""Exercise 7.1: The bytes of each cache strategy

Write `cache_bytes(config, strategy, batch, prompt_len, n_new, n_steps=None, bytes_per_value=4)`:
the bytes of the KV cache that `looplm.generate` keeps for a LoopLM with this config, as in
section 7.3 of chapter 7. One position's keys and values in one block take
2 * n_heads * head_dim values.

- Every prelude block (config.n_prelude) holds one copy of the prompt and one of the decoded
  tokens: (prompt_len + n_new) positions.
- Every core and coda block (config.n_core + config.n_coda) holds S copies of the prompt
  (S = n_steps, default config.n_loops) and, for the decoded tokens, n_new positions in each
  of its slots: S slots for "exact", min(K, S) for "mod-K", 1 for "last", "first", "average".
- All of that times batch and bytes_per_value.
- Raise ValueError for an unknown strategy name (also "mod-0" or "mod-x").

Do not call anything from `looplm.generate`: the point is to count. Grade it with
`python -m looplm.grade ch07`.
"""


def cache_bytes(config, strategy, batch, prompt_len, n_new, n_steps=None, bytes_per_value=4):
    """Bytes of the KV cache of generate(..., cache=strategy) for this config and these sizes."""
    raise NotImplementedError("Exercise 7.1: write cache_bytes")
