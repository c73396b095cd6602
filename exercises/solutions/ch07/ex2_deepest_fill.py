"""Exercise 7.2: The deepest-state fill rule (reference solution)."""

import torch


def fill_deeper(entries: torch.Tensor, exit_steps: torch.Tensor) -> torch.Tensor:
    """entries [S, B, ...] with the steps after each row's exit step replaced by its exit-step entry."""
    S, B = entries.shape[:2]
    if exit_steps.shape != (B,):
        raise ValueError(f"exit_steps must have shape [{B}], got {list(exit_steps.shape)}")
    if exit_steps.numel() and (exit_steps.min() < 1 or exit_steps.max() > S):
        raise ValueError(f"exit steps must lie in [1, {S}]")
    steps = torch.arange(1, S + 1).view(S, 1)                               # (S, 1)
    source = torch.minimum(steps, exit_steps.view(1, B)) - 1                # (S, B): min(t, e) - 1
    index = source.view(S, B, *[1] * (entries.ndim - 2)).expand_as(entries)
    return entries.gather(0, index)
