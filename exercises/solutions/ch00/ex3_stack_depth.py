"""Exercise 0.3: How deep the stack ends

Reference solution: the depth is a Markov chain. From depth 0 the generator always pushes; from
any other depth it pushes or pops with probability 1/2 each. Carry the distribution over depths
forward one operation at a time (a random walk reflected at 0).
"""


def final_depth_distribution(difficulty: int) -> list[float]:
    """[P(depth 0), ..., P(depth difficulty)] after `difficulty` operations drawn by StackTask."""
    if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty < 1:
        raise ValueError(f"difficulty must be an int >= 1, got {difficulty!r}")
    probs = [1.0] + [0.0] * difficulty              # before the first operation: empty
    for _ in range(difficulty):
        after = [0.0] * (difficulty + 1)
        for depth, p in enumerate(probs):
            if p == 0.0:
                continue
            if depth == 0:                          # an empty stack is always pushed on
                after[1] += p
            else:
                after[depth + 1] += p / 2
                after[depth - 1] += p / 2
        probs = after
    return probs
