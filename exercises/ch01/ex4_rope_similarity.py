"""Exercise 1.4: How RoPE forgets

Attention scores a query against a key with a dot product, and rotary embeddings rotate both by
their positions first (section 1.3 of chapter 1). Take one vector q whose head_dim coordinates
are independent standard normal numbers, and use it as the query at position m and as the key
at position n. Its score with itself,

    s(m, n) = <rope_m(q), rope_n(q)>,    rope_m = apply_rope at position m,

is |q|^2 when m = n. How much of that is left when the two positions differ?

Write `rope_similarity(offset, head_dim, base=10000.0)`: the expected score at positions that
are `offset` apart, relative to the expected score at equal positions,

    E[s(n + offset, n)] / E[s(n, n)],

with the expectation over q. Section 1.3's tests show that the score depends on the positions
only through m - n, so n does not matter.

- offset is an int (negative: the key comes after the query); head_dim an even int >= 2;
  base a number > 1, as for `rope_angles`.
- Return a Python float. Raise ValueError for arguments outside these ranges (a bool is not
  an int).

How similar does a vector look to itself 100 positions back, at head_dim 64? The chapter does
not print it. Do not sample: derive it. Grade it with `python -m looplm.grade ch01`, or run
`pytest exercises/ch01/test_ex4_rope_similarity.py`.
"""


def rope_similarity(offset: int, head_dim: int, base: float = 10000.0) -> float:
    """E[<rope_{n+offset}(q), rope_n(q)>] / E[|q|^2] for q with independent standard normal coordinates."""
    raise NotImplementedError("Exercise 1.4: write rope_similarity")
