"""Suite-wide settings: Triton runs in its CPU interpreter, every run is seeded the same way."""

import os

# Must be set before triton is imported anywhere (kernels fall back to the interpreter on CPU).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
