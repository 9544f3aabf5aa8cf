"""Seeded random-orthogonal ``A`` factors (generator ``haar-v1``).

The same (seed, stream, r, d_in, dtype, gain) gives the same bits on every machine,
with any number of threads. See ``docs/generator-haar-v1.md`` for the algorithm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from asymlora import _native
from asymlora._dtypes import DtypeLike, dtype_name, view_bits
from asymlora._validate import check_threads, check_uint


def random_orthogonal(
    r: int,
    d_in: int,
    *,
    seed: int,
    stream: int = 0,
    dtype: DtypeLike = "float32",
    gain: float = 1.0,
    threads: int | None = None,
) -> np.ndarray:
    """An ``r x d_in`` matrix with orthonormal rows, Haar distributed, from (seed, stream).

    Args:
        r: number of rows (the LoRA rank), ``1 <= r <= d_in``.
        d_in: number of columns (the adapted layer's input features).
        seed: adapter seed, ``0 <= seed < 2**64``.
        stream: stream id of this factor within the adapter, ``0 <= stream < 2**64``.
        dtype: "float32", "float16" or "bfloat16" (an ``ml_dtypes.bfloat16`` array).
        gain: factor applied before the single rounding to ``dtype``.
        threads: worker threads (``None``: all cores). The result does not depend on it.

    Raises:
        ValueError: an argument is out of range; the message names it.
    """
    name = dtype_name(dtype)
    bits = _native.random_orthogonal(
        check_uint("r", r),
        check_uint("d_in", d_in),
        check_uint("seed", seed),
        check_uint("stream", stream),
        name,
        float(gain),
        check_threads(threads),
    )
    return view_bits(bits, name)


def random_orthogonal_many(
    shapes: Sequence[tuple[int, int]],
    *,
    seed: int,
    streams: Sequence[int],
    dtype: DtypeLike = "float32",
    gain: float = 1.0,
    threads: int | None = None,
) -> list[np.ndarray]:
    """Many factors at once, in parallel across cores with the GIL released.

    ``shapes[i] = (r, d_in)`` and ``streams[i]`` give factor ``i``; each equals
    ``random_orthogonal(r, d_in, seed=seed, stream=streams[i], ...)`` bit for bit.
    """
    shapes = list(shapes)
    streams = list(streams)
    checked_shapes = []
    for i, shape in enumerate(shapes):
        if len(shape) != 2:
            raise ValueError(f"shapes[{i}] must be (r, d_in), got {shape!r}")
        checked_shapes.append((check_uint("r", shape[0]), check_uint("d_in", shape[1])))
    checked_streams = [check_uint(f"streams[{i}]", s) for i, s in enumerate(streams)]
    name = dtype_name(dtype)
    out = _native.random_orthogonal_many(
        checked_shapes,
        check_uint("seed", seed),
        checked_streams,
        name,
        float(gain),
        check_threads(threads),
    )
    return [view_bits(bits, name) for bits in out]


def gaussian_matrix(r: int, d_in: int, *, seed: int, stream: int = 0) -> np.ndarray:
    """The float64 Gaussian matrix (r x d_in) that ``random_orthogonal`` orthogonalises.

    ``A`` is the transpose of the sign-fixed ``Q`` of ``qr(gaussian_matrix(...).T)``;
    exposed so that independent implementations (e.g. numpy's QR) can be checked.
    """
    return _native.gaussian_matrix(
        check_uint("r", r),
        check_uint("d_in", d_in),
        check_uint("seed", seed),
        check_uint("stream", stream),
    )
