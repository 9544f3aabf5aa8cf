"""Exceptions raised by asymlora (all subclass ``ValueError``)."""

# AdapterMismatchError (an adapter does not fit a model or checkpoint: missing module,
# shape, rank, seed; nothing was changed) is defined in the native module, which raises
# it from the offline merge; the torch layer raises the same class.
from asymlora._native import AdapterFormatError, AdapterMismatchError, SafetensorsError

__all__ = ["AdapterFormatError", "AdapterMismatchError", "SafetensorsError"]
