from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 8.3 (the smallest saturating gate logit). The reference is the
# property itself, checked on each dtype's grid of representable values: the answer saturates
# the sigmoid and the value just below it does not.

import math  # noqa: E402

import torch  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _sigmoid(x, dtype):
    return torch.sigmoid(torch.tensor(x, dtype=dtype)).item()


def test_the_answer_is_the_first_saturating_value_of_each_dtype():
    for dtype in DTYPES:
        v = ex.saturating_logit(dtype)
        assert isinstance(v, float), dtype
        assert float(torch.tensor(v, dtype=dtype)) == v, f"{v} is not representable in {dtype}"
        assert _sigmoid(v, dtype) == 1.0, dtype
        below = torch.nextafter(torch.tensor(v, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)).item()
        assert _sigmoid(below, dtype) < 1.0, dtype


def test_the_values_order_by_precision():
    values = [ex.saturating_logit(dtype) for dtype in DTYPES]
    assert 0 < values[0] < values[1] < values[2] < 30
    for dtype, v in zip(DTYPES, values):
        eps = torch.finfo(dtype).eps
        assert abs(v - math.log(4 / eps)) < 1.0, dtype        # e^-v, the gap to 1, is near eps / 4
