"""Mapping between numpy dtypes, our dtype names and safetensors dtype codes."""

from __future__ import annotations

import functools
from typing import Any, Union

import numpy as np

DtypeLike = Union[str, np.dtype, type]


@functools.cache
def numpy_dtypes() -> dict[str, np.dtype]:
    """Our name -> numpy dtype of the returned arrays."""
    return {
        "float32": np.dtype(np.float32),
        "float16": np.dtype(np.float16),
        "bfloat16": _bfloat16(),
    }


@functools.cache
def safetensors_to_numpy() -> dict[str, np.dtype]:
    """safetensors code -> numpy dtype, for the dtypes an adapter may hold."""
    return {
        "F64": np.dtype(np.float64),
        "F32": np.dtype(np.float32),
        "F16": np.dtype(np.float16),
        "BF16": _bfloat16(),
    }


@functools.cache
def numpy_to_safetensors() -> dict[np.dtype, str]:
    """numpy dtype -> safetensors code (the inverse of :func:`safetensors_to_numpy`)."""
    return {v: k for k, v in safetensors_to_numpy().items()}


def _bfloat16() -> np.dtype:
    # Imported on first use, not with the package: importing ml_dtypes takes about a
    # second on some machines (measured: 1.0-1.4 s of a 1.2 s `asymlora --version`), and
    # the command line (merge, inspect) never needs a bf16 numpy array.
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


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
    # numpy's names are ours (ml_dtypes' bfloat16 is "bfloat16"): no need to import it here
    return np_dtype.name


def from_raw(dtype_code: str, shape: list[int], data: Any) -> np.ndarray:
    """A numpy array over raw little-endian bytes from the native module."""
    return np.frombuffer(data, dtype=safetensors_to_numpy()[dtype_code]).reshape(shape)


def view_bits(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Reinterpret the native module's uint16 bit patterns as ``dtype``."""
    if bits.dtype == np.uint16:
        return bits.view(numpy_dtypes()[dtype])
    return bits
