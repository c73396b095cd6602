"""Exercise 3.2: The warmup-cosine learning-rate schedule

Write `warmup_cosine(step, total_steps, warmup_steps, max_lr, min_lr)`, the trainer's
learning-rate schedule (the one `looplm.train.lr_at` computes), as a plain function of numbers.
With s = step, W = warmup_steps, N = total_steps:

- for s < W the rate rises linearly, from 0 at step 0 towards max_lr at step W;
- from step W to step N it falls from max_lr to min_lr along half a period of a cosine (flat
  at both ends, steepest half way, where it is the mean of max_lr and min_lr);
- after step N it stays at min_lr.

Return a Python float.

Raise ValueError for: a step that is not an int >= 0; total_steps not an int >= 1;
warmup_steps not an int with 0 <= warmup_steps < total_steps; max_lr not > 0; min_lr not in
[0, max_lr]. Do not call `looplm.train.lr_at`: write the formula.

Grade it with `python -m looplm.grade ch03`, or run
`pytest exercises/ch03/test_ex2_warmup_cosine.py`.
"""


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, max_lr: float, min_lr: float) -> float:
    """The learning rate of update `step`: linear warmup from 0 to max_lr, cosine down to min_lr."""
    raise NotImplementedError("Exercise 3.2: write warmup_cosine")
