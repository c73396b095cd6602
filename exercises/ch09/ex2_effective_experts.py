"""Exercise 9.2: How many experts does each step use?

out.expert_load [S, E] gives, for each loop step, the share of its routed assignments that went
to each expert. One number summarises a row: its perplexity exp(H), with H = -sum_e q_e log q_e
(0 log 0 = 0), the "effective number" of experts the step uses: E when the load is uniform, 1
when one expert takes everything.

Write `effective_experts(load)`:

- load: a float tensor [S, E], rows summing to 1 (zero rows are allowed: a step no token ran).
- Return a float tensor [S]: exp(H) of each row, and 0 for an all-zero row.
- Raise ValueError unless load is 2-D with non-negative entries.

Grade it with `python -m looplm.grade ch09`.
"""

import torch


def effective_experts(load: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each row of load [S, E]; 0 for an all-zero row."""
    raise NotImplementedError("Exercise 9.2: write effective_experts")
