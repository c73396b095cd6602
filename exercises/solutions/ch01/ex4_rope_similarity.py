"""Exercise 1.4: How RoPE forgets (reference solution).

RoPE rotates each pair (q_i, q_{i + d/2}) by its own angle, so the score splits into one term per
pair. Rotating a 2-D vector v by an angle a and taking its dot product with v gives |v|^2 cos(a).
Between positions n + offset and n, pair i is turned by offset * theta_i relative to the key,
so

    s(n + offset, n) = sum_i |v_i|^2 cos(offset * theta_i),    theta_i = base^(-2i / d).

For standard normal coordinates E|v_i|^2 = 2 and E|q|^2 = d, so the ratio is the mean of the
d/2 cosines: RoPE keeps 1 at offset 0, and the fast-turning pairs average out with distance
while the slow ones still agree.
"""

import math


def rope_similarity(offset: int, head_dim: int, base: float = 10000.0) -> float:
    """E[<rope_{n+offset}(q), rope_n(q)>] / E[|q|^2] for q with independent standard normal coordinates."""
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise ValueError(f"offset must be an int, got {offset!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be an even int >= 2, got {head_dim!r}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
        raise ValueError(f"base must be a number > 1, got {base!r}")
    half = head_dim // 2
    return sum(math.cos(offset * base ** (-2 * i / head_dim)) for i in range(half)) / half
