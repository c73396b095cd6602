"""Exercise 3.1: Additive injection

Write `AdditiveInjection`, an entry for the `INJECTIONS` registry of `looplm.model` (chapter 3,
section 3.2). A looped model calls it before the core at every step:

    inject(h, x0) = h + RMSNorm_g(x0)

so that the loop computes h_t = core(h_{t-1} + RMSNorm_g(x0)). RMSNorm_g is chapter 1's RMSNorm
(over the last dimension, eps inside the square root) with a gain g of its own.

- `__init__(self, config)`: `config` is a `LoopLMConfig`; use `config.d_model` and
  `config.eps`. The gain g is the module's only parameter, `self.weight`, of shape
  [d_model], initialised to ones.
- `forward(self, h, x0)`: h and x0 are [B, T, d_model]; return [B, T, d_model].
- Compute the norm in float32 and return the result in h's dtype (under bf16 autocast both
  inputs can be bfloat16).
- Write the norm yourself: do not use `looplm.block.RMSNorm` or the package's `AddInjection`.

Once it works, `INJECTIONS["my_add"] = AdditiveInjection` makes
`LoopLMConfig(..., injection="my_add")` build a model with it. Grade it with
`python -m looplm.grade ch03`, or run `pytest exercises/ch03/test_ex1_additive_injection.py`.
"""

import torch
from torch import nn


class AdditiveInjection(nn.Module):
    """inject(h, x0) = h + x0 / sqrt(mean(x0**2) + eps) * weight, weight [d_model] starting at 1."""

    def __init__(self, config):
        super().__init__()
        raise NotImplementedError("Exercise 3.1: write AdditiveInjection.__init__")

    def forward(self, h: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("Exercise 3.1: write AdditiveInjection.forward")
