"""Offline merge of adapters into safetensors checkpoints, streamed by the Rust core.

``merge_files`` never loads a model: it memory-maps the checkpoint, computes each merged
weight in bands of rows and writes it out, so memory stays at a few tens of MiB whatever
the model size, and a 70B merge runs on a CPU box. Neither torch nor transformers is
needed. ``asymlora merge`` on the command line does the same.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple, Union

from asymlora import _native
from asymlora._dtypes import dtype_name
from asymlora._signals import Interrupted, stopping_on_signals
from asymlora._validate import check_threads

__all__ = ["Interrupted", "MergeProgress", "MergeReport", "merge_files", "unmerge_files"]

PathLike = Union[str, "os.PathLike[str]"]


class MergeProgress(NamedTuple):
    """What a ``progress`` callable receives (about ten times a second, and at the end)."""

    bytes_done: int
    bytes_total: int
    modules_done: int
    modules_total: int


#: What a merge did (frozen; built by the core). Attributes:
#:
#: - ``out``: the output file or directory (a ``Path``).
#: - ``files``: safetensors files (and the index) written, by name.
#: - ``copied_files``: other files of a model directory copied as they are (config,
#:   tokenizer, ...); ``config.json`` gets the new ``torch_dtype`` with ``dtype``.
#: - ``skipped``: ``(name, reason)`` for entries of the base directory not copied
#:   (weights in other formats, which would be stale, and subdirectories).
#: - ``merged``: weights changed by LoRA updates; ``modules``: adapter modules applied
#:   (each adapter counted); ``replaced``: tensors replaced by an adapter's full tensors
#:   (PEFT ``modules_to_save``); ``converted``: tensors only converted to ``dtype``;
#:   ``unchanged``: tensors copied bit for bit; ``bytes``: bytes of safetensors written.
#: - ``nonfinite``: values that became NaN or infinite (only with ``allow_nonfinite``).
#: - ``merged_values``: values of the merged weights; ``recomputed``: of those, values
#:   recomputed in float64 because float32 accumulation could not prove their rounding;
#:   every value is the exact result rounded once either way.
#: - ``warnings``: the warnings also issued with :func:`warnings.warn`.
MergeReport = _native.MergeReport


ProgressArg = Union[bool, Callable[[MergeProgress], object]]


def _merge_command(subtract: bool) -> Callable[..., MergeReport]:
    """``merge_files`` (``subtract=False``) or ``unmerge_files``: one signature for both."""

    def command(
        base: PathLike,
        adapters: PathLike | Sequence[PathLike],
        out: PathLike,
        *,
        weights: Sequence[float] | None = None,
        dtype: object = None,
        threads: int | None = None,
        progress: ProgressArg = False,
        force: bool = False,
        prefix_map: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        allow_nonfinite: bool = False,
        fsync: bool = True,
    ) -> MergeReport:
        paths = _adapter_paths(adapters)
        pairs = list(zip(paths, _weights(weights, len(paths))))
        callback, close = _progress_callback(progress)
        try:
            with stopping_on_signals():
                report: MergeReport = _native.merge(
                    os.fspath(base),
                    pairs,
                    os.fspath(out),
                    dtype=None if dtype is None else dtype_name(dtype),
                    threads=check_threads(threads),
                    force=bool(force),
                    prefix_map=_prefix_pairs(prefix_map),
                    allow_nonfinite=bool(allow_nonfinite),
                    subtract=subtract,
                    fsync=bool(fsync),
                    progress=callback,
                )
        finally:
            close()
        _warn(report)
        return report

    return command


def _warn(report: MergeReport) -> None:
    for message in report.warnings:
        warnings.warn(message, stacklevel=4)
    if report.skipped:
        listed = ", ".join(f"{name} ({why})" for name, why in report.skipped)
        warnings.warn(f"not copied to {report.out}: {listed}", stacklevel=4)


merge_files = _merge_command(subtract=False)
merge_files.__name__ = merge_files.__qualname__ = "merge_files"
merge_files.__doc__ = """Merges adapters into a checkpoint on disk.

    ``W' = W + sum_i w_i * s_i * B_i @ A_i`` for every adapted weight.

    Each merged weight is computed in float32 (float64 for float32/float64 outputs) from
    its stored dtype and rounded once, to nearest even, to the output dtype: the result
    is the float64 reference rounded once. Every other tensor is copied bit for bit. The
    merge of a given set of adapters is the same to the bit whatever ``threads`` is.

    Args:
        base: a ``.safetensors`` file (``out`` is then a file) or a model directory with
            ``model.safetensors``, or shards and ``model.safetensors.index.json`` (``out``
            is then a directory with the same files, the index, and the directory's other
            files copied).
        adapters: one or more asymlora adapter files (``A`` regenerated from the seed) or
            PEFT LoRA directories (``adapter_config.json`` + ``adapter_model.safetensors``;
            ``fan_in_fan_out``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern`` and
            ``modules_to_save`` honoured; DoRA, quantised and pickle-only adapters refused,
            exactly as :func:`asymlora.import_peft` refuses them: one reader serves both).
        out: where to write; it appears only when complete (a failure or Ctrl-C leaves
            nothing under that name). Hidden temporaries next to ``out`` that a killed
            merge into ``out`` left are removed first (a warning names them).
        weights: one weight per adapter (default 1 each); several adapters merge as the
            exact weighted sum of their updates.
        dtype: output dtype of every floating-point tensor (``"bfloat16"``, ``"float16"``,
            ``"float32"``, a numpy or torch dtype); ``None`` keeps each tensor's dtype.
        threads: worker threads (default: all cores).
        progress: ``True`` for a progress display on stderr (tqdm when installed and
            stderr is a terminal, else a line now and then), or a callable receiving
            :class:`MergeProgress`; an exception it raises stops the merge (nothing is
            written) and propagates.
        force: replace an existing ``out`` (a file, or a directory holding only a model).
        prefix_map: ``{OLD: NEW}`` or ``[(OLD, NEW), ...]``: adapter module and tensor names
            starting with ``OLD`` are looked up in ``base`` as ``NEW`` instead (the first
            matching pair applies).
        allow_nonfinite: merge adapters holding NaN/Inf, and keep weights that overflow
            the output dtype, instead of refusing.
        fsync: flush every written file to disk before the final rename.

    Returns:
        A :class:`MergeReport`.

    Raises:
        AdapterMismatchError: an adapter does not fit ``base`` (a module without weight,
            a shape, a dtype that cannot be merged into); the message lists the first
            problems and suggests a ``prefix_map`` when names differ by a prefix.
        AdapterFormatError: an adapter file or PEFT directory is malformed or unsupported.
        SafetensorsError: a corrupt or truncated safetensors file.
        CheckpointError: a broken checkpoint directory (index, shards).
        NonFiniteError: NaN/Inf values in an adapter, or a merged weight that overflows.
        FileExistsError: ``out`` exists (without ``force``), or is or holds an input.
        FileNotFoundError: an input or the parent directory of ``out`` is missing.
        ValueError: bad arguments.
        Interrupted: SIGINT (Ctrl-C), SIGTERM or SIGHUP during the merge: it stops at
            its next poll and removes its temporaries (nothing is written). A subclass of
            ``KeyboardInterrupt``, so existing Ctrl-C handling holds; ``signum`` says
            which signal. For the length of the call, from the main thread only, the
            default actions of these signals are replaced by a handler raising it (a
            handler of your own, or an ignored signal, is left as it is), and the
            previous handlers are restored after. A ``KeyboardInterrupt`` raised by a
            handler of your own propagates as it is.

    Durability: see docs/offline-merge.md ("Crashes and signals").
    """

unmerge_files = _merge_command(subtract=True)
unmerge_files.__name__ = unmerge_files.__qualname__ = "unmerge_files"
unmerge_files.__doc__ = """Subtracts adapters from a merged checkpoint.

    ``W' = W - sum_i w_i * s_i * B_i @ A_i`` for every adapted weight.

    The inverse of :func:`merge_files` with the same adapters and weights, up to the
    rounding of the merged weights (one rounding each way). Adapters with full tensors
    (PEFT ``modules_to_save``) cannot be unmerged. Arguments, result and errors as for
    :func:`merge_files`.
    """


def _adapter_paths(adapters: PathLike | Sequence[PathLike]) -> list[str]:
    if isinstance(adapters, (str, os.PathLike)):
        return [os.fspath(adapters)]
    paths = [os.fspath(a) for a in adapters]
    if not paths:
        raise ValueError("invalid argument `adapters`: give at least one adapter")
    return paths


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    values = [_weight(i, w) for i, w in enumerate(weights)]
    if len(values) != n:
        raise ValueError(
            f"invalid argument `weights`: {len(values)} weight(s) for {n} adapter(s); "
            "give one weight per adapter"
        )
    bad = [w for w in values if not math.isfinite(w)]
    if bad:
        raise ValueError(f"invalid argument `weights`: must be finite numbers, got {bad[0]}")
    return values


def _weight(i: int, w: object) -> float:
    # float() alone says "could not convert string to float" without naming the
    # argument; True is not a weight (as in combine_adapters).
    try:
        if isinstance(w, bool):
            raise TypeError
        return float(w)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        message = f"invalid argument `weights`: weights[{i}] must be a number, got {w!r}"
        raise ValueError(message) from None


def _prefix_pairs(
    prefix_map: Mapping[str, str] | Sequence[tuple[str, str]] | None,
) -> list[tuple[str, str]]:
    if prefix_map is None:
        return []
    items = list(prefix_map.items()) if isinstance(prefix_map, Mapping) else list(prefix_map)
    pairs = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(
                f"invalid argument `prefix_map`: {item!r} is not an (OLD, NEW) pair of strings"
            )
        old, new = item
        if not isinstance(old, str) or not isinstance(new, str) or old == new:
            raise ValueError(
                f"invalid argument `prefix_map`: ({old!r}, {new!r}) must be two different strings"
            )
        pairs.append((old, new))
    return pairs


def _progress_callback(
    progress: ProgressArg,
) -> tuple[Callable[[int, int, int, int], None] | None, Callable[[], None]]:
    """The native callback for ``progress``, and a function that closes its display."""
    if progress is False or progress is None:
        return None, lambda: None
    if callable(progress):
        user = progress

        def forward(done: int, total: int, mdone: int, mtotal: int) -> None:
            user(MergeProgress(done, total, mdone, mtotal))

        return forward, lambda: None
    if progress is not True:
        raise ValueError(
            f"invalid argument `progress`: expected True, False or a callable, got {progress!r}"
        )
    if not sys.stderr.isatty():  # a log file or pipe: plain lines, no carriage returns
        return _text_progress(terminal=False)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _text_progress(terminal=True)
    bars: list[Any] = []  # created at the first report, when the total is known

    def update(done: int, total: int, mdone: int, mtotal: int) -> None:
        if not bars:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging")
            bars.append(bar)
        bar = bars[0]
        bar.set_postfix_str(f"{mdone}/{mtotal} modules", refresh=False)
        bar.update(done - bar.n)

    def close() -> None:
        for bar in bars:
            bar.close()

    return update, close


def _text_progress(
    terminal: bool,
) -> tuple[Callable[[int, int, int, int], None], Callable[[], None]]:
    """Progress as text on stderr: one line redrawn in place on a terminal, else a new
    line at each further tenth of the work (so logs get a few lines, not frames)."""
    shown = [False]
    tenths = [-1]

    def update(done: int, total: int, mdone: int, mtotal: int) -> None:
        percent = 100.0 * done / total if total else 100.0
        text = (
            f"merging: {done / 2**20:,.0f}/{total / 2**20:,.0f} MiB ({percent:.0f}%), "
            f"{mdone}/{mtotal} modules"
        )
        if terminal:
            sys.stderr.write("\r" + text)
        elif int(percent // 10) > tenths[0]:
            tenths[0] = int(percent // 10)
            sys.stderr.write(text + "\n")
        else:
            return
        sys.stderr.flush()
        shown[0] = True

    def close() -> None:
        if shown[0] and terminal:
            sys.stderr.write("\n")
            sys.stderr.flush()

    return update, close
