# Generated from book/03_fixed_loops.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['hidden_norms', 'step_changes']
# fmt: on

import torch

# --- book/03_fixed_loops.py:637 (cell 49) ---
def _check_hidden_states(hidden, min_steps=1):
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.ndim != 4:
        raise ValueError(f"hidden must be a floating-point tensor [S, B, T, D] (out.hidden of "
                         f"model(idx, return_hidden=True)), got "
                         f"{getattr(hidden, 'dtype', type(hidden).__name__)} "
                         f"{list(getattr(hidden, 'shape', []))}")
    if hidden.shape[0] < min_steps:
        raise ValueError(f"hidden has S={hidden.shape[0]} steps; at least {min_steps} needed")


def hidden_norms(hidden):
    """RMS of each loop state per token: hidden [S, B, T, D] -> [S, B, T], sqrt(mean_d h^2)."""
    _check_hidden_states(hidden)
    return hidden.float().pow(2).mean(dim=-1).sqrt()


def step_changes(hidden):
    """Relative change of the state per step and token: [S, B, T, D] -> [S-1, B, T].

    Entry t-2 is ||h_t - h_{t-1}|| / ||h_{t-1}|| for t = 2..S (steps counted from 1). A zero
    previous state gives inf (or nan if the state did not move either).
    """
    _check_hidden_states(hidden, min_steps=2)
    h = hidden.float()
    return (h[1:] - h[:-1]).norm(dim=-1) / h[:-1].norm(dim=-1)
