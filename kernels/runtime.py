# Generated from book/10_triton_kernels.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['INTERPRET', 'KERNEL_DTYPES', 'runs_in_triton', 'next_power_of_2', 'row_tiles']
# fmt: on

import os

import torch

# --- book/10_triton_kernels.py:108 (cell 4) ---
# read once, as triton itself reads it when a kernel is defined
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:                  # macOS, Windows, or not installed: the kernels' modules still import
    HAS_TRITON = False

    class _Launch:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(f"{self.fn.__name__} is a Triton kernel, and Triton is not installed "
                               "(pip install triton; Linux only)")

    class _NoTriton:
        """Stands in for `triton` and `triton.language`: @jit wraps a kernel whose launch raises,
        and any other name (tl.constexpr in a signature) is None."""

        def jit(self, fn=None, **options):
            return _Launch(fn) if fn is not None else _Launch

        def __getattr__(self, name):
            return None

    triton = tl = _NoTriton()

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def runs_in_triton(*tensors):
    """True when all `tensors` can go to a Triton kernel here: Triton is installed, the dtype is
    float16, bfloat16 or float32, and the tensor is on a GPU, or on the CPU with the interpreter
    on (TRITON_INTERPRET=1) and not in bfloat16, which the interpreter computes wrongly."""
    if not HAS_TRITON:
        return False
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            return False
        if t.device.type == "cuda":
            continue
        if t.device.type != "cpu" or not INTERPRET or t.dtype == torch.bfloat16:
            return False
    return True


def next_power_of_2(n):
    """The smallest power of two >= n (>= 1): block sizes must be powers of two."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def row_tiles(d, max_elements=4096):
    """(rows per program, padded row width, warps) for a row-wise kernel over rows of d numbers:
    one wide row per program on a GPU-sized row, several short rows per program otherwise, so
    that no program holds more than `max_elements` numbers (and the interpreter, which pays per
    program, runs few of them)."""
    block_d = next_power_of_2(d)
    block_m = max(1, min(32, max_elements // block_d))
    return block_m, block_d, min(16, max(1, block_m * block_d // 512))
