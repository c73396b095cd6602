"""Exercise 2.2: The looped forward pass

Reference solution. See exercises/ch02/ex2_looped_forward.py for the task.
"""

import torch

from looplm.model import LoopLM


def looped_logits(model: LoopLM, idx: torch.Tensor, n_loops: int) -> torch.Tensor:
    """Logits after each of n_loops steps: idx [B, T] -> [n_loops, B, T, vocab_size]."""
    cos, sin = model.rope(idx.shape[1])            # (T, hs/2) each
    h = model.embed(idx)                           # (B, T, D)
    for block in model.prelude:
        h = block(h, cos, sin)                     # x0 = h_0
    logits = []
    for _ in range(n_loops):
        for block in model.core:                   # the same blocks every step
            h = block(h, cos, sin)                 # h_t
        y = h
        for block in model.coda:                   # the readout's side branch
            y = block(y, cos, sin)
        logits.append(model.lm_head(model.norm(y)))  # (B, T, V)
    return torch.stack(logits)                     # (S, B, T, V)
