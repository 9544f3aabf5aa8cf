"""Argument checks for the Python API: errors name the argument."""

from __future__ import annotations

import math
import numbers

_U64_LIMIT = 2**64


def check_uint(name: str, value: object, *, minimum: int = 0) -> int:
    """``value`` as an int in ``[minimum, 2**64)``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum or value >= _U64_LIMIT:
        raise ValueError(f"{name} must be an integer in [{minimum}, 2**64), got {value}")
    return value


def check_finite(name: str, value: object) -> float:
    """``value`` as a finite float, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_threads(threads: object) -> int | None:
    if threads is None:
        return None
    return check_uint("threads", threads, minimum=1)


def list_problems(problems: list[str], limit: int = 10) -> str:
    """The first ``limit`` problems, one per indented line, and how many more there are."""
    shown = "".join(f"\n  {p}" for p in problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return shown + more
