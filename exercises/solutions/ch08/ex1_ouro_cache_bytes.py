"""Exercise 8.1: Ouro's cache, from its config (reference solution)."""


def ouro_cache_bytes(config: dict, n_tokens: int, bytes_per_value: int = 2) -> int:
    """Bytes of the keys and values Ouro caches for n_tokens tokens."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    slots = config.get("total_ut_steps", 4) * config["num_hidden_layers"]      # one per (step, layer)
    return 2 * slots * kv_heads * head_dim * bytes_per_value * n_tokens
