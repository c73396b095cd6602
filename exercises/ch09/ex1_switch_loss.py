"""Exercise 9.1: The Switch loss, from its definition

For one router call on N tokens with E experts and k choices per token:

    loss = E * sum_i f_i * P_i

where f_i is the fraction of the N * k assignments that chose expert i (every choice counts,
dropped ones too) and P_i is the mean over the N tokens of the router probability of expert i.

Write `switch_loss(chosen, probs, n_experts)`:

- chosen: a LongTensor [N, k] of expert ids; probs: a float tensor [N, E], rows summing to 1.
- Return a scalar tensor. The gradient must flow through probs only (f is a count).
- Raise ValueError when chosen and probs disagree on N, or probs has not n_experts columns.

Grade it with `python -m looplm.grade ch09`.
"""

import torch


def switch_loss(chosen: torch.Tensor, probs: torch.Tensor, n_experts: int) -> torch.Tensor:
    """E * sum_i f_i P_i for one router call."""
    raise NotImplementedError("Exercise 9.1: write switch_loss")
