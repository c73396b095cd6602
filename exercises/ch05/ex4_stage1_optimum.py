"""Exercise 5.4: Where Stage I sends the exit mass

Stage I (section 5.3 of chapter 5) minimises, for every token, Σ_t p_t L_t − β H(p). Hold the
step losses L_1 .. L_S fixed, which is how the gate sees them in one update, and ask where the
gate would put the exit mass if it could put it anywhere.

Write two functions.

`stage1_optimum(step_losses, beta)`:
- step_losses: a floating-point tensor [S, ...] of per-token losses, steps first, all finite.
- beta: a number > 0.
- Return the exit distribution p, same shape and dtype, that minimises Σ_t p_t L_t − β H(p)
  over all distributions on the S steps, for every token separately (so p sums to 1 over dim 0).
  The tests train free exit gates with the package's own `stage1_loss` and `exit_distribution`
  and check that your p is where that training goes, and that no p does better.
- Raise ValueError when beta is not a finite number > 0, or step_losses is not a
  floating-point tensor with a step dimension and finite values.

`beta_for_entropy(step_losses, entropy)`:
- step_losses: one token's losses, a 1-D floating-point tensor [S].
- Return, as a Python float, the β > 0 whose optimum has exactly this entropy H(p) (nats), to
  a relative 1e-9 in the entropy.
- Raise ValueError when no β > 0 gives that entropy (which entropies can an optimum have?),
  or step_losses is not 1-D.

Which β gives H(p) = 1 nat for the losses (2, 1, 0.5, 0.25)? The chapter does not say.
Grade it with `python -m looplm.grade ch05`.
"""

import torch


def stage1_optimum(step_losses: torch.Tensor, beta: float) -> torch.Tensor:
    """The exit distribution p [S, ...] that minimises Σ_t p_t L_t − β H(p) for fixed losses."""
    raise NotImplementedError("Exercise 5.4: write stage1_optimum")


def beta_for_entropy(step_losses: torch.Tensor, entropy: float) -> float:
    """The β > 0 whose Stage I optimum for one token's losses [S] has entropy H(p) = entropy."""
    raise NotImplementedError("Exercise 5.4: write beta_for_entropy")
