"""Exercise 7.3: How far is each shared cache from the exact one?

Ouro found the first-step cache far worse than the last-step and averaged ones (section 7.3 of
chapter 7). Measure why, on the entries themselves.

A decoded token, once it has run all S steps, has one exact entry (its keys, or its values, in
one core or coda block) per step: E_1 .. E_S. A later token's step t should read E_t. A
strategy hands it instead R_t, whatever the token left in the decoded slot that step t reads
(section 7.3's table). Write `shared_cache_error(entries, strategy)`:

- entries: a floating-point tensor [S, ...], steps first, E_t = entries[t - 1]; the rest of the
  shape is one token's heads and head dimensions, or several tokens' (they all count together).
- strategy: "exact", "first", "last", "average" or "mod-K" (K >= 1).
- Return, as a Python float, the relative squared error

      sum over t of |R_t - E_t|^2  /  sum over t of |E_t|^2

  for a token that ran every step (no early exit).
- Raise ValueError for an unknown strategy name, and for entries that are not a
  floating-point tensor with a step dimension, hold NaN or inf, or are all zero.

The tests compare your numbers with the slots that `looplm.generate` fills while decoding
with each strategy. Then ask: which one-slot cache is closest to the exact one, and is that a
property of the model or of arithmetic? Which is closer, "first" or "last", in an untrained
model, and why? Grade it with `python -m looplm.grade ch07`.
"""

import torch


def shared_cache_error(entries: torch.Tensor, strategy: str) -> float:
    """Σ_t |R_t - E_t|² / Σ_t |E_t|²: how far what each step reads is from the exact entry."""
    raise NotImplementedError("Exercise 7.3: write shared_cache_error")
