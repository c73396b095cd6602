"""Exercise 8.3: When does Ouro's default exit early?

Ouro's released configs set early_exit_threshold = 1.0: a token exits at step t < S only if the
CDF of its exit distribution computes to 1.0 there. In exact arithmetic that never happens before
the last step; in low precision it happens once an exit gate lambda = sigmoid(x) rounds to exactly
1.0, so that 1 - lambda is 0.

Write `saturating_logit(dtype)`:

- dtype: torch.bfloat16, torch.float16 or torch.float32.
- Return, as a Python float, the smallest value v that is representable in `dtype`
  (float(torch.tensor(v, dtype=dtype)) == v) such that torch.sigmoid(torch.tensor(v, dtype=dtype))
  is exactly 1.0. The next representable value below v must give a sigmoid below 1.0.

Then answer for yourself: why is the bfloat16 value so much smaller than float32's, and what does
it mean for a bfloat16 model whose gate logits reach 10?

Grade it with `python -m looplm.grade ch08`.
"""

import torch


def saturating_logit(dtype: torch.dtype) -> float:
    """The smallest logit of `dtype` whose sigmoid, computed in `dtype`, is exactly 1.0."""
    raise NotImplementedError("Exercise 8.3: write saturating_logit")
