"""Exercise 7.1: The bytes of each cache strategy (reference solution)."""

import re


def _slots(strategy, n_steps):
    if strategy == "exact":
        return n_steps
    if strategy in ("last", "first", "average"):
        return 1
    match = re.fullmatch(r"mod-([0-9]+)", strategy) if isinstance(strategy, str) else None
    if match and int(match.group(1)) >= 1:
        return min(int(match.group(1)), n_steps)
    raise ValueError(f"unknown cache strategy {strategy!r}")


def cache_bytes(config, strategy, batch, prompt_len, n_new, n_steps=None, bytes_per_value=4):
    """Bytes of the KV cache of generate(..., cache=strategy) for this config and these sizes."""
    n_steps = config.n_loops if n_steps is None else n_steps
    slots = _slots(strategy, n_steps)
    position = 2 * config.n_heads * (config.d_model // config.n_heads)
    prelude = config.n_prelude * (prompt_len + n_new)
    looped = (config.n_core + config.n_coda) * (n_steps * prompt_len + slots * n_new)
    return (prelude + looped) * position * batch * bytes_per_value
