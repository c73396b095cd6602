"""Exercise 2.3: What a step costs

Section 2.9 counts parameters and finds that the number of loop steps does not change them. The
compute is another matter. Count it for the matrix multiplications of the model's `nn.Linear`
layers, at 2 floating-point operations (a multiply and an add) per weight per token: a layer
with weight [out, in] applied to N tokens costs 2 * in * out * N FLOPs.

Write `linear_flops(config, n_tokens, n_loops=None)`: the FLOPs of every `nn.Linear` call that
one forward pass `LoopLM(config)(idx)` makes, for an idx of n_tokens tokens in all (B * T), with
n_loops steps (config.n_loops when None). Return a dict of Python ints with the keys

    "prelude"  the prelude's blocks
    "core"     the core's blocks, over all the steps
    "coda"     the coda's blocks, over all the steps
    "head"     the LM head, over all the steps

Attention's score and value products (q k^T and the weighted sum of v) are not nn.Linear calls
and are not counted; nor are the norms, the embedding lookup and the softmax.

- config is a LoopLMConfig with injection="none" and exit_gate=False (the models of this
  chapter); n_tokens an int >= 1; n_loops None or an int >= 1 (bools are not ints).
- Raise ValueError for anything else.

How much more than a GPT of the same effective depth does a looped model compute, and where
does the difference go? The chapter does not print it. Grade it with
`python -m looplm.grade ch02`, or run `pytest exercises/ch02/test_ex3_step_cost.py`.
"""

from looplm.model import LoopLMConfig


def linear_flops(config: LoopLMConfig, n_tokens: int, n_loops: int | None = None) -> dict[str, int]:
    """FLOPs of the nn.Linear calls in one forward pass, by part: prelude, core, coda, head."""
    raise NotImplementedError("Exercise 2.3: write linear_flops")
