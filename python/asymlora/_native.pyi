"""Type stubs for the compiled module ``asymlora._native`` (private; use ``asymlora``)."""

from collections.abc import Callable
from os import PathLike
from typing import Any

import numpy as np
import numpy.typing as npt

GENERATORS: list[str]
FORMAT_VERSION: str

class AdapterFormatError(ValueError):
    """An adapter file or config is malformed; the message names the module and field."""

class SafetensorsError(ValueError):
    """A file is not a valid safetensors file (header, offsets or sizes are wrong)."""

class AdapterMismatchError(ValueError):
    """An adapter does not fit a model or checkpoint (missing module, shape, rank, seed)."""

_RawTensor = tuple[str, list[int], bytearray]

def random_orthogonal(
    r: int,
    d_in: int,
    seed: int,
    stream: int = 0,
    dtype: str = "float32",
    gain: float = 1.0,
    threads: int | None = None,
) -> npt.NDArray[np.float32] | npt.NDArray[np.uint16]: ...
def random_orthogonal_many(
    shapes: list[tuple[int, int]],
    seed: int,
    streams: list[int],
    dtype: str = "float32",
    gain: float = 1.0,
    threads: int | None = None,
) -> list[npt.NDArray[np.float32] | npt.NDArray[np.uint16]]: ...
def gaussian_matrix(r: int, d_in: int, seed: int, stream: int = 0) -> npt.NDArray[np.float64]: ...

class AdapterFile:
    def __init__(self, path: str | PathLike[str]) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def config_json(self) -> str: ...
    @property
    def file_size(self) -> int: ...
    @property
    def classic_lora_size(self) -> int: ...
    def tensor_names(self) -> list[str]: ...
    def tensor(self, name: str) -> _RawTensor: ...
    def lora_a(self, module: str) -> _RawTensor: ...
    def inspect(self) -> str: ...

def write_adapter(
    path: str | PathLike[str],
    config_json: str,
    tensors: list[tuple[str, str, list[int], bytes]],
) -> None: ...

class SafetensorsFile:
    def __init__(self, path: str | PathLike[str]) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def metadata(self) -> dict[str, str]: ...
    def infos(self) -> dict[str, tuple[str, list[int]]]: ...
    def tensor(self, name: str) -> _RawTensor: ...

def write_safetensors(
    path: str | PathLike[str],
    metadata: dict[str, str],
    tensors: list[tuple[str, str, list[int], bytes]],
) -> None: ...
def merge(
    base: str | PathLike[str],
    adapters: list[tuple[str | PathLike[str], float]],
    out: str | PathLike[str],
    *,
    dtype: str | None = None,
    threads: int | None = None,
    force: bool = False,
    prefix_map: list[tuple[str, str]] = ...,
    allow_nonfinite: bool = False,
    subtract: bool = False,
    fsync: bool = True,
    progress: Callable[[int, int, int, int], object] | None = None,
) -> dict[str, Any]: ...
def cli_main(argv: list[str], python_commands: str = "") -> int: ...
