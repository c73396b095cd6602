# Generated from book/00_tasks_and_tokens.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['ArgumentTypeError', 'require_int', 'require_number', 'require_bool', 'require_choice']
# fmt: on

import math

# --- book/00_tasks_and_tokens.py:179 (cell 12) ---
class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. Also a ValueError, so `except ValueError` catches it."""


def _interval(low, high, low_open=False, high_open=False):
    """' >= 1', ' > 0', ' <= 9' or ' in (0, 1]': the words for the allowed range."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def require_int(name, value, low=None, high=None):
    """`value` if it is an int (not a bool) in [low, high]; either bound may be None."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int{_interval(low, high)}, got {value!r} "
                                f"of type {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int{_interval(low, high)}, got {value!r}")
    return value


def require_number(name, value, low=None, high=None, *, low_open=False, high_open=False):
    """`value` as a float if it is a finite int or float (not a bool) in the range; an open end
    excludes its bound."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be a finite number{_interval(low, high, low_open, high_open)}, "
                                f"got {value!r} of type {type(value).__name__}")
    if (not math.isfinite(value)
            or (low is not None and (value <= low if low_open else value < low))
            or (high is not None and (value >= high if high_open else value > high))):
        raise ValueError(f"{name} must be a finite number{_interval(low, high, low_open, high_open)}, "
                         f"got {value!r}")
    return float(value)


def require_bool(name, value):
    """`value` if it is True or False."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r}")
    return value


def require_choice(name, value, allowed):
    """`value` if it is one of the strings in `allowed`."""
    if not isinstance(value, str) or value not in allowed:
        names = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {names}; got {value!r}")
    return value
