"""Exercise 2.2: The looped forward pass

Write `looped_logits(model, idx, n_loops)`: run a `LoopLM`'s parts by hand and return the
logits read out after every loop step, a tensor [n_loops, B, T, V]: the logits that
`model(idx, n_loops=n_loops).logits` returns (sections 2.3 and 2.6 of chapter 2). The model
uses no input injection and starts the loop from the embedding (the defaults).

- The parts are `model.embed`, `model.prelude`, `model.core`, `model.coda` (lists of blocks,
  possibly empty), `model.norm` and `model.lm_head`.
- Every block is called as `block(h, cos, sin)` with the rope rows for the sequence:
  `cos, sin = model.rope(T)`.
- Use `n_loops` (an int >= 1), not `model.config.n_loops`.

Do not call `model(...)` or its `encode`/`step`/`readout` methods: the point is to write the
loop. Grade it with `python -m looplm.grade ch02`, or run
`pytest exercises/ch02/test_ex2_looped_forward.py`.
"""

import torch

from looplm.model import LoopLM


def looped_logits(model: LoopLM, idx: torch.Tensor, n_loops: int) -> torch.Tensor:
    """Logits after each of n_loops steps: idx [B, T] -> [n_loops, B, T, vocab_size]."""
    raise NotImplementedError("Exercise 2.2: write looped_logits")
