"""Exercise 8.3: When does Ouro's default exit early? (reference solution)."""

import torch


def saturating_logit(dtype: torch.dtype) -> float:
    """The smallest logit of `dtype` whose sigmoid, computed in `dtype`, is exactly 1.0."""
    def saturates(x):
        return torch.sigmoid(torch.tensor(x, dtype=dtype)).item() == 1.0

    lo, hi = 0.0, 128.0                       # sigmoid(0) = 1/2; sigmoid(128) is 1 in every float dtype
    for _ in range(100):                      # bisect on float64, then settle on the dtype's grid
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if saturates(mid) else (mid, hi)
    v = torch.tensor(hi, dtype=dtype)
    down = torch.tensor(float("-inf"), dtype=dtype)
    while saturates(torch.nextafter(v, down).item()):
        v = torch.nextafter(v, down)
    while not saturates(v.item()):
        v = torch.nextafter(v, -down)
    return v.item()
