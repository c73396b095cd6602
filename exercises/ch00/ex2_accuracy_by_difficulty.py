"""Exercise 0.2: Accuracy by difficulty

To see where a model stops generalizing we need its accuracy at each difficulty, not one number.
Write `accuracy_by_difficulty(correct, difficulty)`:

- `correct` is a 1-D bool tensor [B], for example `answer_accuracy(logits, batch.targets)`;
- `difficulty` is a 1-D integer tensor [B], for example `batch.difficulty` of a `TaskBatch`;
- return a dict {difficulty: fraction of those examples that are correct}, with one entry for
  every difficulty that occurs, keys as Python ints in increasing order, values as Python floats.

    accuracy_by_difficulty(torch.tensor([True, False, True]), torch.tensor([2, 2, 5]))
        == {2: 0.5, 5: 1.0}

Raise ValueError when `correct` is not a 1-D bool tensor, when `difficulty` is not a 1-D integer
tensor, when their lengths differ, or when they are empty.

Grade it with `python -m looplm.grade ch00`, or run
`pytest exercises/ch00/test_ex2_accuracy_by_difficulty.py`.
"""

import torch


def accuracy_by_difficulty(correct: torch.Tensor, difficulty: torch.Tensor) -> dict[int, float]:
    """{difficulty: fraction correct} over the examples of each difficulty, in increasing order."""
    raise NotImplementedError("Exercise 0.2: write accuracy_by_difficulty")
