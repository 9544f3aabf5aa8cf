"""Plain safetensors files through the Rust core (numpy in and out, bfloat16 included).

The ``safetensors`` package's numpy API has no bfloat16, and its torch API needs torch;
the core's reader and writer (the safetensors crate) keep every dtype's bits and write
atomically with a sorted header, so the same tensors always give the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asymlora import _native
from asymlora._dtypes import from_raw, numpy_to_safetensors, safetensors_to_numpy
from asymlora.errors import SafetensorsError

__all__ = ["SafetensorsError", "SafetensorsFile", "TensorEntry", "write_safetensors"]


@dataclass(frozen=True)
class TensorEntry:
    """Dtype code (``"F32"``, ``"BF16"``, ``"I64"``, ...) and shape of a stored tensor."""

    dtype: str
    shape: tuple[int, ...]


class SafetensorsFile:
    """A memory-mapped safetensors file; the header is checked on open.

    Raises:
        SafetensorsError: a malformed header, offsets or sizes (a ``ValueError``).
        FileNotFoundError: ``path`` does not exist.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._native = _native.SafetensorsFile(os.fspath(path))
        self.path = Path(path)
        self.metadata: dict[str, str] = self._native.metadata
        self.entries: dict[str, TensorEntry] = {
            name: TensorEntry(dtype, tuple(shape))
            for name, (dtype, shape) in self._native.infos().items()
        }

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, names: Mapping[str, str]) -> dict[str, np.ndarray]:
        """``{key: array}`` for ``{key: tensor name in the file}`` (float tensors only)."""
        out = {}
        for key, name in names.items():
            dtype, shape, data = self._native.tensor(name)
            if dtype not in safetensors_to_numpy():
                raise ValueError(
                    f"{self.path}: tensor {name!r} has dtype {dtype}, not a float dtype"
                )
            out[key] = from_raw(dtype, shape, data)
        return out


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> None:
    """Writes float ``tensors`` (bf16 as ``ml_dtypes.bfloat16``) atomically, reproducible bytes."""
    raw = []
    for name, value in tensors.items():
        array = np.asarray(value, order="C")
        code = numpy_to_safetensors().get(array.dtype)
        if code is None:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, not a float dtype")
        raw.append((name, code, list(array.shape), array.tobytes()))
    _native.write_safetensors(os.fspath(path), dict(metadata), raw)
