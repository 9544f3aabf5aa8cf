"""Exceptions raised by asymlora (all subclass ``ValueError``)."""

from asymlora._native import AdapterFormatError, SafetensorsError


class AdapterMismatchError(ValueError):
    """An adapter does not fit a model (missing module, shape, rank, seed); nothing was changed."""


__all__ = ["AdapterFormatError", "AdapterMismatchError", "SafetensorsError"]
