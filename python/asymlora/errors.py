"""Exceptions raised by asymlora (all subclass ``ValueError``)."""

# AdapterMismatchError (an adapter does not fit a model or checkpoint: missing module,
# shape, rank, seed; nothing was changed) is defined in the native module, which raises
# it from the offline merge; the torch layer raises the same class.
from asymlora._native import AdapterFormatError, AdapterMismatchError, SafetensorsError


class DistributedMismatchError(ValueError):
    """The ranks of a ``torch.distributed`` job hold different frozen adapter factors.

    Every rank regenerates its frozen ``A`` from the seed instead of receiving it, so
    they must agree on the seed, the adapted modules and their shapes. Raised on every
    rank alike, with a message naming the ranks that differ and the likely cause.
    """


__all__ = [
    "AdapterFormatError",
    "AdapterMismatchError",
    "DistributedMismatchError",
    "SafetensorsError",
]
