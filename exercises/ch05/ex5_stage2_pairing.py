"""Exercise 5.5: Which gate does Stage II teach?

Section 5.4 of chapter 5 pairs the label w_t of step t's improvement with the gate of step
t - 1, while Ouro's Eq. 6 as printed pairs it with the gate of step t. Find out what each
pairing does to the gates, without training anything.

Write `stage2_trained_gates(step_losses, gate, pairing="book", k=50.0, gamma=0.005)`: the gates
that Stage II ends with when it is trained to convergence with the step losses held fixed
and every token's gate values free (each λ_t of each token its own parameter), starting from
`gate`.

- step_losses, gate: floating-point tensors [S, ...] of the same shape, S >= 2, gate values
  in (0, 1). Steps come first; the other dimensions are tokens.
- pairing="book": the loss is section 5.4's, `looplm.adaptive.stage2_gate_loss`.
  pairing="paper": the same loss with the label w_t paired with λ_t instead of λ_{t-1}, for
  t = 2 .. S.
- Return a tensor like `gate`. A gate that the loss gives no gradient keeps its value from
  `gate`.
- Raise ValueError for another pairing, for shapes that differ or fewer than 2 steps, and for
  gate values outside (0, 1).

The tests train the gates with the package's own loss and compare. Then use your function:
for a token whose losses are (1.0, 0.4, 0.39, 0.39), where step 2 helps a lot and the later
steps hardly at all, and untrained gates of 1/2, which expected exit step does each pairing
give (`looplm.adaptive.expected_depth` of `exit_distribution`)? The chapter does not say.
Grade it with `python -m looplm.grade ch05`.
"""

import torch


def stage2_trained_gates(step_losses: torch.Tensor, gate: torch.Tensor, pairing: str = "book",
                         k: float = 50.0, gamma: float = 0.005) -> torch.Tensor:
    """The gates [S, ...] that Stage II converges to from `gate` with free per-token gates."""
    raise NotImplementedError("Exercise 5.5: write stage2_trained_gates")
