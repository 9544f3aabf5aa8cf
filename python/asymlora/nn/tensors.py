"""numpy <-> torch conversion that keeps bfloat16 bits (numpy has no bfloat16 of its own)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy of ``tensor``; bfloat16 becomes ``ml_dtypes.bfloat16``, same bits."""
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch tensor owning a copy of ``array``; ``ml_dtypes.bfloat16`` -> ``torch.bfloat16``."""
    array = np.ascontiguousarray(array)
    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())
