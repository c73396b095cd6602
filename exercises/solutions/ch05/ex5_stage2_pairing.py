"""Exercise 5.5: Which gate does Stage II teach?

Reference solution. See exercises/ch05/ex5_stage2_pairing.py for the task.
"""

import torch

from looplm.adaptive import stage2_targets


def stage2_trained_gates(step_losses: torch.Tensor, gate: torch.Tensor, pairing: str = "book",
                         k: float = 50.0, gamma: float = 0.005) -> torch.Tensor:
    """The gates [S, ...] that Stage II converges to from `gate` with free per-token gates."""
    if pairing not in ("book", "paper"):
        raise ValueError(f"pairing must be 'book' or 'paper', got {pairing!r}")
    for name, x in (("step_losses", step_losses), ("gate", gate)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
            raise ValueError(f"{name} must be a floating-point tensor [S, ...]")
    if step_losses.shape != gate.shape:
        raise ValueError(f"step_losses {list(step_losses.shape)} and gate {list(gate.shape)} differ in shape")
    if gate.shape[0] < 2:
        raise ValueError(f"stage II needs at least 2 steps, got S={gate.shape[0]}")
    if not ((gate > 0) & (gate < 1)).all():
        raise ValueError("gate values must lie in (0, 1)")
    # each free gate appears in one binary cross-entropy term, against the soft label w for
    # "continue" = 1 - λ: the minimum is at 1 - λ = w
    stop = (1 - stage2_targets(step_losses, k, gamma)).to(gate.dtype)   # 1 - w_t, t = 2..S: (S-1, ...)
    trained = gate.detach().clone()
    if pairing == "book":
        trained[:-1] = stop          # λ_1 .. λ_{S-1} learn; λ_S gets no gradient (and is unused)
    else:
        trained[1:] = stop           # λ_2 .. λ_S learn; λ_1 keeps its value
    return trained
