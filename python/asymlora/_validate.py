"""Argument checks for the Python API: errors name the argument."""

from __future__ import annotations

import numbers

_U64_LIMIT = 2**64


def check_uint(name: str, value: object, *, minimum: int = 0) -> int:
    """``value`` as an int in ``[minimum, 2**64)``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum or value >= _U64_LIMIT:
        low = "a non-negative" if minimum == 0 else f"an integer >= {minimum} and"
        raise ValueError(f"{name} must be {low} integer below 2**64, got {value}")
    return value


def check_threads(threads: object) -> int | None:
    if threads is None:
        return None
    return check_uint("threads", threads, minimum=1)
