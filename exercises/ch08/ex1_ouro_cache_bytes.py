"""Exercise 8.1: Ouro's cache, from its config

Ouro's code keeps one cache slot per (loop step, layer): every layer runs at every step, and its
keys and values differ from step to step. Each slot holds, per token, a key and a value vector of
num_key_value_heads * head_dim numbers.

Write `ouro_cache_bytes(config, n_tokens, bytes_per_value=2)`:

- config: an Ouro config.json as a dict. Read num_hidden_layers, total_ut_steps (default 4),
  num_attention_heads, num_key_value_heads (default: num_attention_heads), hidden_size and
  head_dim (default: hidden_size // num_attention_heads).
- n_tokens: how many tokens the cache holds (an int >= 0).
- bytes_per_value: 2 for bfloat16, 4 for float32.
- Return the bytes of all keys and values, an int.

Grade it with `python -m looplm.grade ch08`.
"""


def ouro_cache_bytes(config: dict, n_tokens: int, bytes_per_value: int = 2) -> int:
    """Bytes of the keys and values Ouro caches for n_tokens tokens."""
    raise NotImplementedError("Exercise 8.1: write ouro_cache_bytes")
