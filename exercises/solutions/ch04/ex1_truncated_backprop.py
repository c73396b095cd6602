"""Exercise 4.1: Truncated backpropagation

Reference solution. See exercises/ch04/ex1_truncated_backprop.py for the task.
"""

import torch

from looplm.model import LoopLM


def truncated_logits(model: LoopLM, idx: torch.Tensor, n_loops: int, grad_steps: int) -> torch.Tensor:
    """Logits after each of n_loops steps, [n_loops, B, T, V]; only the last grad_steps are differentiated."""
    for name, value in (("n_loops", n_loops), ("grad_steps", grad_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if grad_steps > n_loops:
        raise ValueError(f"grad_steps={grad_steps} must be <= n_loops={n_loops}")
    cos, sin = model.rope(idx.shape[1])               # (T, hs/2) each
    x0 = model.encode(idx, cos, sin)                  # (B, T, D)
    h = model.init_state(x0)
    logits = []
    for t in range(n_loops):
        with torch.set_grad_enabled(torch.is_grad_enabled() and t >= n_loops - grad_steps):
            h = model.step(h, x0, cos, sin)           # h_t: (B, T, D)
            logits.append(model.readout(h, cos, sin)[0])   # (B, T, V)
    return torch.stack(logits)                        # (S, B, T, V)
