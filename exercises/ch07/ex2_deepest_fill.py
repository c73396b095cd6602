"""Exercise 7.2: The deepest-state fill rule

A token that exits at step e never computes its keys and values for the steps after e. Chapter 7
fills those entries by the deepest-state rule: the entry for every deeper step t > e is a copy
of the entry for step e.

Write `fill_deeper(entries, exit_steps)`:

- entries: a tensor [S, B, ...]: for each of B tokens (one per row), its entry (keys or values)
  for every step 1..S. Entries of steps after a token's exit step hold garbage.
- exit_steps: a LongTensor [B] of exit steps, counted from 1 (1 <= e <= S).
- Return a NEW tensor of the same shape where, for every row b, the entries of steps
  t > exit_steps[b] equal the entry of step exit_steps[b], and all other entries are unchanged.
  Do not modify `entries`.
- Raise ValueError if exit_steps is not of shape [B] or holds a step outside [1, S].

Grade it with `python -m looplm.grade ch07`.
"""

import torch


def fill_deeper(entries: torch.Tensor, exit_steps: torch.Tensor) -> torch.Tensor:
    """entries [S, B, ...] with the steps after each row's exit step replaced by its exit-step entry."""
    raise NotImplementedError("Exercise 7.2: write fill_deeper")
