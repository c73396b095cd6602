"""Exercise 5.3: The Stage II targets and gate loss

Write `stage2_gate_loss(step_losses, gate, k=50.0, gamma=0.005, mask=None)`, the loss Ouro's
Stage II trains the exit gate with (Eqs. 5 and 6, section 5.4 of chapter 5). For every token i
and every step t = 2 .. S (counted from 1):

    I_t   = max(0, L_{t-1} - L_t)           the improvement of step t, on DETACHED losses
    w_t   = sigmoid(k * (I_t - gamma))      the target for "continue", a number in (0, 1)
    BCE_t = -[ w_t * log(1 - λ_{t-1}) + (1 - w_t) * log(λ_{t-1}) ]
                                            binary cross-entropy between the target and the
                                            gate's "continue" probability 1 - λ_{t-1}
    loss  = (1 / S) * sum over t = 2..S of ( mean of BCE_t over the tokens )

- step_losses: floating-point tensor [S, ...] of per-token losses (as `LoopOutput.step_losses`);
  gate: floating-point tensor of the same shape, values in [0, 1] (as `LoopOutput.gate`).
  Steps come first; the other dimensions are tokens ([S, B, T] from a model, or [S, N]).
- The targets are labels, not something to optimise: no gradient may reach step_losses.
  Gradients reach the gate. Note the gate of step t-1 is paired with the improvement of step t,
  so λ_S gets no gradient; and the sum has S - 1 terms but is divided by S. This pairing is the
  book's: Ouro's Eq. 6 as printed pairs w^(t) with λ^(t) (chapter 5, section 5.4, says why the
  book deviates).
- mask: None (every token counts) or a bool tensor with the token shape [...]; the mean over
  tokens then runs over the tokens where mask is True only. Whatever the other tokens hold
  must not change the result.
- Clamp each log at -100, as `torch.nn.functional.binary_cross_entropy` does, so a gate of
  exactly 0 or 1 gives a large but finite loss. Compute in the inputs' dtype (at least float32).
- Return a scalar tensor. Raise ValueError when step_losses and gate differ in shape, when
  there are fewer than 2 steps, when a gate value lies outside [0, 1], when mask does not have
  the token shape or selects no token, or when k <= 0.

Do not call `looplm.adaptive.stage2_gate_loss` or `stage2_targets`: the point is to write them.
Grade it with `python -m looplm.grade ch05`, or run
`pytest exercises/ch05/test_ex3_stage2_targets.py`.
"""

import torch


def stage2_gate_loss(step_losses: torch.Tensor, gate: torch.Tensor, k: float = 50.0,
                     gamma: float = 0.005, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Ouro's Stage II gate loss: BCE of "continue" = 1 - λ_{t-1} against w_t, over t = 2..S, / S."""
    raise NotImplementedError("Exercise 5.3: write stage2_gate_loss")
