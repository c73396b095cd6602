"""Exercise 9.3: Bias balancing with gradient accumulation

DeepSeek-V3's auxiliary-loss-free balancing moves a bias b [E] after each optimizer step:
b_i += gamma * sign(mean(c) - c_i), where c counts the assignments to each expert since the last
update. With gradient accumulation, several forwards (micro-batches) run before each optimizer
step, and in a looped model each forward calls the same router once per loop step.

Write `accumulated_bias(counts, gamma, forwards_per_update)`:

- counts: a float tensor [F, S, E]: for each of F forwards and each of its S loop steps, the
  assignments per expert.
- gamma: the step size; forwards_per_update: how many forwards make one optimizer step (F is a
  multiple of it).
- Return the bias [E] after all F forwards, starting from zeros, with exactly one update per
  optimizer step that sees all the counts since the previous one.

Then answer for yourself: how would the bias differ if the update ran after every forward, or
after every loop step, and which pitfall of section 9.5 is each?

Grade it with `python -m looplm.grade ch09`.
"""

import torch


def accumulated_bias(counts: torch.Tensor, gamma: float, forwards_per_update: int) -> torch.Tensor:
    """The bias [E] after the updates of DeepSeek-V3's balancing, once per optimizer step."""
    raise NotImplementedError("Exercise 9.3: write accumulated_bias")
