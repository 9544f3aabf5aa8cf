"""Mapping between numpy dtypes, our dtype names and safetensors dtype codes."""

from __future__ import annotations

from typing import Any, Union

import ml_dtypes
import numpy as np

DtypeLike = Union[str, np.dtype, type]

#: our name -> numpy dtype of the returned arrays
NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}

#: safetensors code <-> numpy dtype, for the dtypes an adapter may hold
SAFETENSORS_TO_NUMPY: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
NUMPY_TO_SAFETENSORS: dict[np.dtype, str] = {v: k for k, v in SAFETENSORS_TO_NUMPY.items()}


def dtype_name(dtype: object) -> str:
    """Our name for ``dtype`` ("float32", "float16", "bfloat16", ...): strings pass
    through, numpy dtypes (``ml_dtypes.bfloat16`` included) map to their names, and torch
    dtypes (``torch.bfloat16``) lose their prefix, without importing torch. The core
    parses and checks the name."""
    if isinstance(dtype, str):
        return dtype
    try:
        np_dtype = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:
        text = str(dtype)
        return text[len("torch.") :] if text.startswith("torch.") else text
    for name, candidate in NUMPY_DTYPES.items():
        if candidate == np_dtype:
            return name
    return str(np_dtype)


def from_raw(dtype_code: str, shape: list[int], data: Any) -> np.ndarray:
    """A numpy array over raw little-endian bytes from the native module."""
    return np.frombuffer(data, dtype=SAFETENSORS_TO_NUMPY[dtype_code]).reshape(shape)


def view_bits(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Reinterpret the native module's uint16 bit patterns as ``dtype``."""
    if bits.dtype == np.uint16:
        return bits.view(NUMPY_DTYPES[dtype])
    return bits
