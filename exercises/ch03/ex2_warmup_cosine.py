"""Exercise 3.2: The warmup-cosine learning-rate schedule

Write `warmup_cosine(step, total_steps, warmup_steps, max_lr, min_lr)`, the schedule of
chapter 3, section 3.5, as a plain function of numbers. With s = step, W = warmup_steps,
N = total_steps:

    s < W:       max_lr * s / W                                            (linear warmup from 0)
    W <= s <= N: min_lr + 0.5 * (max_lr - min_lr) * (1 + cos(pi * (s - W) / (N - W)))
    s > N:       min_lr

So the rate is 0 at step 0, max_lr at step W and min_lr at step N. Return a Python float.

Raise ValueError for: a step that is not an int >= 0; total_steps not an int >= 1;
warmup_steps not an int with 0 <= warmup_steps < total_steps; max_lr not > 0; min_lr not in
[0, max_lr]. Do not call `looplm.train.lr_at`: write the formula.

Grade it with `python -m looplm.grade ch03`, or run
`pytest exercises/ch03/test_ex2_warmup_cosine.py`.
"""


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, max_lr: float, min_lr: float) -> float:
    """The learning rate of update `step`: linear warmup from 0 to max_lr, cosine down to min_lr."""
    raise NotImplementedError("Exercise 3.2: write warmup_cosine")
