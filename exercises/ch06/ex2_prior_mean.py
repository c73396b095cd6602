"""Exercise 6.2: A prior with a given mean

PonderNet's prior halts at every step with probability lambda_p. Truncated to S steps the way
`exit_distribution` truncates (the last step takes the mass that remains), its expected exit
step is less than 1 / lambda_p: chapter 6, section 6.2 shows lambda_p = 1/2 giving 1.875 over 4
steps instead of 2.

Write `lambda_for_mean_depth(mean_depth, n_steps)`: the lambda_p in (0, 1] whose truncated prior
over n_steps steps has exactly the expected exit step mean_depth (to 1e-9), as a Python float.

- n_steps is an int >= 2; mean_depth is a number with 1 <= mean_depth < n_steps (1 means
  lambda_p = 1; n_steps could only be reached with lambda_p = 0, which is not a prior).
- Raise ValueError for anything else.

Which lambda_p gives a mean of 2 steps over 4? The chapter does not print it.
Grade it with `python -m looplm.grade ch06`.
"""


def lambda_for_mean_depth(mean_depth: float, n_steps: int) -> float:
    """The lambda_p whose geometric prior, truncated at n_steps steps, has mean mean_depth."""
    raise NotImplementedError("Exercise 6.2: write lambda_for_mean_depth")
