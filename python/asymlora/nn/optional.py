"""Classes of optional libraries, looked up without importing them."""

from __future__ import annotations

import sys


def loaded_class(module: str, name: str) -> type | None:
    """``module.name`` when ``module`` is already imported, else ``None``.

    An object can be an instance of a class only after the class's module has run, so
    an ``isinstance`` check against an optional class (transformers' ``Conv1D``, torch's
    ``DTensor`` and ``FSDPModule``) never needs to import its module, which can take
    seconds, or fail where the library is missing.
    """
    return getattr(sys.modules.get(module), name, None)
