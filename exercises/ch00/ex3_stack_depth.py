"""Exercise 0.3: How deep the stack ends

The answer to a stack prompt is what is left on the stack, so its length is the stack's final
depth. Section 0.4's figure shows the stack answers staying short as the programs grow, and
section 0.5 finds that short programs often leave nothing at all. How often, exactly?

Write `final_depth_distribution(difficulty)`: the probability that a program drawn by
`StackTask` at this difficulty (that many operations) leaves 0, 1, ..., difficulty digits on
the stack, computed from how `StackTask.generate` draws its operations, without sampling.

- difficulty is an int >= 1 (not a bool); raise ValueError for anything else.
- Return a list of difficulty + 1 Python floats: entry k is P(final depth = k). They sum to 1.

The chapter does not print these numbers. From your list you can read off the accuracy of the
trivial model that always answers with the empty string, and the mean answer length that the
figure plots. Grade it with `python -m looplm.grade ch00`, or run
`pytest exercises/ch00/test_ex3_stack_depth.py`.
"""


def final_depth_distribution(difficulty: int) -> list[float]:
    """[P(depth 0), ..., P(depth difficulty)] after `difficulty` operations drawn by StackTask."""
    raise NotImplementedError("Exercise 0.3: write final_depth_distribution")
