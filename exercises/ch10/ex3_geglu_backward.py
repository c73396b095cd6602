"""Exercise 10.3: The backward pass of GeGLU, as a kernel

Chapter 10 fuses SwiGLU, silu(g) * u. GeGLU (arXiv 2002.05202) gates with GELU instead, here in
its tanh form:

    y = gelu(g) * u,   gelu(g) = 0.5 g (1 + tanh(c (g + 0.044715 g^3))),   c = sqrt(2 / pi)

which is torch's F.gelu(g, approximate="tanh") * u. Work out its backward by hand, then write it
as a Triton kernel `_geglu_backward_kernel` and the function `geglu_backward(g, u, dy)`:

- g, u, dy: float tensors of one shape and dtype (float32 or float16), any number of elements.
- Return (dg, du), in that dtype: the gradients of sum(y * dy) with respect to g and u, computed
  in float32 inside the kernel.
- Raise ValueError if the shapes or dtypes differ.
- Triton has no tanh in triton.language; tanh(a) = 2 sigmoid(2a) - 1 is one way round that.

Grade it with `python -m looplm.grade ch10`.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _geglu_backward_kernel(G, U, DY, DG, DU, n, BLOCK: tl.constexpr):
    # your kernel: an element-wise block of BLOCK numbers per program
    pass


def geglu_backward(g: torch.Tensor, u: torch.Tensor, dy: torch.Tensor):
    """(dg, du) for y = gelu_tanh(g) * u and upstream gradient dy."""
    raise NotImplementedError("Exercise 10.3: write geglu_backward and its kernel")
