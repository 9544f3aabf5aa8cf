"""Exceptions raised by asymlora, all under :class:`AsymloraError`.

Every data error subclasses both :class:`AsymloraError` and ``ValueError`` (what it was
before the common base existed), so ``except AsymloraError`` catches everything asymlora
refuses and ``except ValueError`` keeps working. Bad arguments raise plain
``ValueError``/``TypeError`` and file-system failures the matching ``OSError``
(``FileNotFoundError``, ``FileExistsError``, ...), as Python's own functions do.

The classes raised by the Rust core are defined in the native module; the torch layer
raises the same classes.
"""

from asymlora._native import (
    AdapterFormatError,
    AdapterMismatchError,
    AsymloraError,
    CheckpointError,
    NonFiniteError,
    SafetensorsError,
)


class DistributedMismatchError(AsymloraError, ValueError):
    """The ranks of a ``torch.distributed`` job hold different frozen adapter factors.

    Every rank regenerates its frozen ``A`` from the seed instead of receiving it, so
    they must agree on the seed, the adapted modules and their shapes. Raised on every
    rank alike, with a message naming the ranks that differ and the likely cause.
    """


class QuantizedBaseError(AsymloraError, ValueError):
    """A quantised base layer cannot do what was asked: an in-memory merge into a backend
    that cannot requantise (torchao), for instance. The message names the layer type and
    the way that works (the offline merge into the float checkpoint)."""


__all__ = [
    "AdapterFormatError",
    "AdapterMismatchError",
    "AsymloraError",
    "CheckpointError",
    "DistributedMismatchError",
    "NonFiniteError",
    "QuantizedBaseError",
    "SafetensorsError",
]
