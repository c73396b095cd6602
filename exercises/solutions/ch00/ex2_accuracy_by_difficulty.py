"""Exercise 0.2: Accuracy by difficulty

Reference solution: one masked mean per distinct difficulty.
"""

import torch


def accuracy_by_difficulty(correct: torch.Tensor, difficulty: torch.Tensor) -> dict[int, float]:
    """{difficulty: fraction correct} over the examples of each difficulty, in increasing order."""
    if not isinstance(correct, torch.Tensor) or correct.ndim != 1 or correct.dtype != torch.bool:
        raise ValueError(f"correct must be a 1-D bool tensor, got {getattr(correct, 'shape', None)} "
                         f"{getattr(correct, 'dtype', type(correct).__name__)}")
    if (not isinstance(difficulty, torch.Tensor) or difficulty.ndim != 1
            or difficulty.is_floating_point() or difficulty.dtype == torch.bool):
        raise ValueError(f"difficulty must be a 1-D integer tensor, got "
                         f"{getattr(difficulty, 'shape', None)} "
                         f"{getattr(difficulty, 'dtype', type(difficulty).__name__)}")
    if len(correct) != len(difficulty) or len(correct) == 0:
        raise ValueError(f"correct and difficulty must be non-empty and of the same length, got "
                         f"{len(correct)} and {len(difficulty)}")
    return {int(d): correct[difficulty == d].float().mean().item() for d in difficulty.unique()}
