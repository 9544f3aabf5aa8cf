"""Exact adapter algebra: several adapters combined into one, by the Rust core.

``combine_adapters`` writes one adapter file whose update is the weighted sum of the
inputs' updates, ``s·B·A = sum_i w_i s_i B_i A_i``, exact up to one rounding of ``B``.
Adapters that share ``A`` (same seed, stream, rank, ...) stay seed-plus-B with their
``B``\\ s summed; the others are concatenated (``A`` stored, ranks added). Neither torch
nor transformers is needed. ``asymlora combine`` on the command line does the same.
Spec: docs/combine.md.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Sequence
from typing import Union

from asymlora import _native
from asymlora._dtypes import dtype_name

__all__ = ["CombineReport", "combine_adapters"]

PathLike = Union[str, "os.PathLike[str]"]
AdapterArg = Union[PathLike, tuple[PathLike, float]]

#: What a combination did (frozen; built by the core). Attributes:
#:
#: - ``out``: the adapter file written (a ``Path``).
#: - ``adapters``: input adapters; ``modules``: modules written.
#: - ``shared``: modules whose inputs all share one ``A``: ``B``\ s summed, rank kept.
#: - ``concatenated``: modules over several distinct ``A``\ s: ``A``\ s stacked (stored),
#:   ranks added.
#: - ``stored_a``: modules whose ``A`` the output stores (every concatenated one, and
#:   shared ones whose ``A`` is stored in the input or comes from another seed).
#: - ``full_tensors``: full tensors copied (``modules_to_save``).
#: - ``warnings``: the warnings also issued with :func:`warnings.warn`.
CombineReport = _native.CombineReport


def combine_adapters(
    adapters: PathLike | Sequence[AdapterArg],
    out: PathLike,
    *,
    b_dtype: object = None,
    force: bool = False,
) -> CombineReport:
    """Combines adapters into one adapter file: its update is ``sum_i w_i s_i B_i @ A_i``.

    Per module, inputs whose ``A`` is the same matrix (same generator, seed, ``a_dtype``,
    ``a_gain``, stream, rank and ``d_in``; or the same stored tensor) keep that ``A`` and
    the rank, and ``B = sum_i w_i (s_i / s) B_i`` (``s``: the output module's scale, from
    the first input's alpha). Inputs with different ``A``\\ s are concatenated: ``A =
    vstack(A_i)`` is stored, the rank is the sum of the ranks, ``s = 1`` and ``B =
    hstack(w_i s_i B_i)``. ``B`` is computed in float64 and rounded once. A module held by
    only some inputs combines over those. The output's seed, generator, rank, alpha,
    scaling and ``base_model`` are the first input's.

    Args:
        adapters: asymlora adapter files or PEFT LoRA directories, each a path (weight 1)
            or a ``(path, weight)`` pair; a single path is one adapter.
        out: the adapter file to write (atomically: it appears only when complete).
        b_dtype: dtype of every combined ``B`` (``"float32"``, ``"float16"``,
            ``"bfloat16"``, ``"float64"`` or a numpy dtype). ``None``: per module, the
            inputs' ``B`` dtype when they all agree, else float32 (float64 if one is).
            Choose ``"float64"`` when a float32 base must merge to within one ulp of
            merging the inputs themselves (see docs/combine.md).
        force: replace ``out`` if it exists (never an input).

    Returns:
        A :class:`CombineReport`.

    Raises:
        AdapterMismatchError: the inputs do not fit together (one module name with two
            shapes, different ``fan_in_fan_out``), or a full tensor would be weighted or
            summed; nothing is written.
        AdapterFormatError: an adapter file or PEFT directory is malformed or unsupported.
        NonFiniteError: NaN/Inf in an input, or a combined ``B`` that overflows ``b_dtype``.
        FileExistsError: ``out`` exists (without ``force``) or is an input.
        FileNotFoundError: an input or the parent directory of ``out`` is missing.
        ValueError: bad arguments (no adapters, a weight that is not a finite number).
    """
    pairs = _pairs(adapters)
    report: CombineReport = _native.combine(
        pairs,
        os.fspath(out),
        b_dtype=None if b_dtype is None else dtype_name(b_dtype),
        force=bool(force),
    )
    for message in report.warnings:
        warnings.warn(message, stacklevel=2)
    return report


def _pairs(adapters: PathLike | Sequence[AdapterArg]) -> list[tuple[PathLike, float]]:
    if isinstance(adapters, (str, os.PathLike)):
        return [(os.fspath(adapters), 1.0)]
    pairs: list[tuple[PathLike, float]] = []
    for item in adapters:
        if isinstance(item, (str, os.PathLike)):
            pairs.append((os.fspath(item), 1.0))
            continue
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(
                f"invalid argument `adapters`: {item!r} is neither a path nor a (path, weight) pair"
            )
        path, weight = item
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise ValueError(
                f"invalid argument `adapters`: the weight of {os.fspath(path)!r} must be a "
                f"number, got {weight!r}"
            )
        if not math.isfinite(weight):
            raise ValueError(
                f"invalid argument `adapters`: the weight of {os.fspath(path)!r} must be a "
                f"finite number, got {weight}"
            )
        pairs.append((os.fspath(path), float(weight)))
    if not pairs:
        raise ValueError("invalid argument `adapters`: give at least one adapter")
    return pairs
