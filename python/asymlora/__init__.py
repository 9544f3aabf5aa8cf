"""asymlora: asymmetric low-rank adapters.

Freeze ``A`` as a seeded random-orthogonal matrix, train only ``B``. ``A`` is
regenerated bit for bit from (seed, stream) on any machine, so an adapter ships
only ``B`` and a seed. This package never imports torch at import time; the torch
layer is an optional extra (``pip install asymlora[torch]``).
"""

from importlib.metadata import PackageNotFoundError, version

from asymlora._native import FORMAT_VERSION, GENERATORS, AdapterFormatError
from asymlora.adapter import Adapter, AdapterConfig, ModuleConfig, read_adapter, write_adapter
from asymlora.orthogonal import gaussian_matrix, random_orthogonal, random_orthogonal_many

try:
    __version__ = version("asymlora")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = [
    "FORMAT_VERSION",
    "GENERATORS",
    "Adapter",
    "AdapterConfig",
    "AdapterFormatError",
    "ModuleConfig",
    "__version__",
    "gaussian_matrix",
    "random_orthogonal",
    "random_orthogonal_many",
    "read_adapter",
    "write_adapter",
]
