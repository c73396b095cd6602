"""looplm.kernels: Triton kernels for the loop (chapter 10), each with a torch fallback.

Importing this package never needs Triton: without it (or for inputs a kernel does not take)
every function computes its torch reference. LoopLMConfig(kernels="triton") switches a model
onto the kernels; see looplm.kernels.loop.kernel_plan for what runs where.

    looplm.kernels.runtime        whether a tensor can go to a kernel here; block sizes
    looplm.kernels.update         masked_update: where(active, x + delta, h), for early exit
    looplm.kernels.rmsnorm        add_rmsnorm: RMSNorm fused with the injection (or a residual add)
    looplm.kernels.swiglu         swiglu: silu(g) * u
    looplm.kernels.rope           rope: rotary embeddings, chapter 1's convention
    looplm.kernels.attention      flash_attention: causal attention, forward and backward
    looplm.kernels.cross_entropy  multi_exit_linear_cross_entropy: every exit's loss, no logits
    looplm.kernels.loop           the kernel model: use_kernels, kernel_plan
"""

from looplm.kernels.attention import flash_attention  # noqa: F401
from looplm.kernels.cross_entropy import multi_exit_linear_cross_entropy  # noqa: F401
from looplm.kernels.rmsnorm import add_rmsnorm  # noqa: F401
from looplm.kernels.rope import rope  # noqa: F401
from looplm.kernels.swiglu import swiglu  # noqa: F401
from looplm.kernels.update import masked_update  # noqa: F401

__all__ = ["add_rmsnorm", "flash_attention", "masked_update", "multi_exit_linear_cross_entropy", "rope", "swiglu"]
