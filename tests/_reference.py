"""Independent float64 references shared by the merge tests."""

from __future__ import annotations

import numpy as np


def round_once(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 -> ``dtype`` rounded once (bf16/f16 via round-to-odd float32)."""
    if dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        return x.astype(dtype)
    x32 = x.astype(np.float32)
    back = x32.astype(np.float64)
    inexact = back != x
    toward_zero = inexact & (np.abs(back) > np.abs(x))
    bits = (x32.view(np.uint32) - toward_zero.astype(np.uint32)) | inexact.astype(np.uint32)
    return bits.view(np.float32).astype(dtype)
