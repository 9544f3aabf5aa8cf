"""Type stubs for the compiled module ``asymlora._native`` (private; use ``asymlora``).

Checked against the built module by ``python -m mypy.stubtest asymlora._native
--allowlist stubtest-allowlist.txt`` in the test command: CI fails when they disagree.
"""

from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import final

import numpy as np
import numpy.typing as npt

__all__ = [
    "FORMAT_VERSION",
    "GENERATORS",
    "KINDS",
    "PEFT_CONFIG_NAME",
    "PEFT_KEY_PREFIX",
    "PEFT_PARAMETER_ORDER",
    "PEFT_PICKLE_WEIGHTS_NAME",
    "PEFT_WEIGHTS_NAME",
    "SCALINGS",
    "AdapterFile",
    "AdapterFormatError",
    "AdapterMismatchError",
    "AsymloraError",
    "CheckpointError",
    "CombineReport",
    "MergeReport",
    "NonFiniteError",
    "PatternRule",
    "SafetensorsError",
    "SafetensorsFile",
    "check_config",
    "cli_main",
    "combine",
    "gaussian_matrix",
    "import_peft",
    "merge",
    "random_orthogonal",
    "random_orthogonal_many",
    "scale",
    "scaling_name",
    "write_adapter",
    "write_safetensors",
]

GENERATORS: list[str]
FORMAT_VERSION: str
SCALINGS: list[str]
KINDS: list[str]
PEFT_CONFIG_NAME: str
PEFT_WEIGHTS_NAME: str
PEFT_PICKLE_WEIGHTS_NAME: str
PEFT_KEY_PREFIX: str
PEFT_PARAMETER_ORDER: list[str]

class AsymloraError(Exception):
    """Base of every error asymlora raises about adapters, checkpoints and files it refuses."""

class AdapterFormatError(AsymloraError, ValueError):
    """An adapter file, PEFT adapter directory or adapter config is malformed or unsupported."""

class AdapterMismatchError(AsymloraError, ValueError):
    """An adapter does not fit a model or checkpoint (missing module, shape, rank, seed)."""

class SafetensorsError(AsymloraError, ValueError):
    """A file is not a valid safetensors file (header, offsets or sizes are wrong)."""

class CheckpointError(AsymloraError, ValueError):
    """A model checkpoint (file, shard set or index) cannot be used as a merge base."""

class NonFiniteError(AsymloraError, ValueError):
    """NaN or infinite values where finite ones are required."""

_StrPath = str | PathLike[str]
#: (dtype code, shape, bytes) of one tensor
_RawTensor = tuple[str, list[int], bytearray]
#: (name, dtype code, shape, bytes) of one tensor to write
_TensorArg = tuple[str, str, list[int], bytes]
_Factor = npt.NDArray[np.float32] | npt.NDArray[np.uint16]

def random_orthogonal(
    r: int,
    d_in: int,
    seed: int,
    stream: int = 0,
    dtype: str = "float32",
    gain: float = 1.0,
    threads: int | None = None,
) -> _Factor: ...
def random_orthogonal_many(
    shapes: list[tuple[int, int]],
    seed: int,
    streams: list[int],
    dtype: str = "float32",
    gain: float = 1.0,
    threads: int | None = None,
) -> list[_Factor]: ...
def gaussian_matrix(r: int, d_in: int, seed: int, stream: int = 0) -> npt.NDArray[np.float64]: ...

@final
class AdapterFile:
    def __new__(cls, path: _StrPath) -> AdapterFile: ...
    @property
    def path(self) -> Path: ...
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

def write_adapter(path: _StrPath, config_json: str, tensors: list[_TensorArg]) -> None: ...
def check_config(config_json: str) -> None: ...
def scale(scaling: str, alpha: float, rank: int) -> float: ...
def scaling_name(rslora: bool) -> str: ...

@final
class SafetensorsFile:
    def __new__(cls, path: _StrPath) -> SafetensorsFile: ...
    @property
    def path(self) -> Path: ...
    @property
    def metadata(self) -> dict[str, str]: ...
    def infos(self) -> dict[str, tuple[str, list[int]]]: ...
    def tensor(self, name: str) -> _RawTensor: ...

def write_safetensors(
    path: _StrPath, metadata: dict[str, str], tensors: list[_TensorArg]
) -> None: ...

@final
class MergeReport:
    """What a merge did (frozen)."""

    @property
    def out(self) -> Path: ...
    @property
    def files(self) -> list[str]: ...
    @property
    def copied_files(self) -> list[str]: ...
    @property
    def skipped(self) -> list[tuple[str, str]]: ...
    @property
    def merged(self) -> int: ...
    @property
    def modules(self) -> int: ...
    @property
    def replaced(self) -> int: ...
    @property
    def converted(self) -> int: ...
    @property
    def unchanged(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def nonfinite(self) -> int: ...
    @property
    def merged_values(self) -> int: ...
    @property
    def recomputed(self) -> int: ...
    @property
    def warnings(self) -> list[str]: ...

def merge(
    base: _StrPath,
    adapters: list[tuple[_StrPath, float]],
    out: _StrPath,
    *,
    dtype: str | None = None,
    threads: int | None = None,
    force: bool = False,
    prefix_map: list[tuple[str, str]] = ...,
    allow_nonfinite: bool = False,
    subtract: bool = False,
    fsync: bool = True,
    progress: Callable[[int, int, int, int], object] | None = None,
) -> MergeReport: ...
def import_peft(peft_dir: _StrPath, path: _StrPath, seed: int) -> list[str]: ...

@final
class CombineReport:
    """What a combination did (frozen)."""

    @property
    def out(self) -> Path: ...
    @property
    def adapters(self) -> int: ...
    @property
    def modules(self) -> int: ...
    @property
    def shared(self) -> int: ...
    @property
    def concatenated(self) -> int: ...
    @property
    def stored_a(self) -> int: ...
    @property
    def full_tensors(self) -> int: ...
    @property
    def warnings(self) -> list[str]: ...

def combine(
    adapters: list[tuple[_StrPath, float]],
    out: _StrPath,
    *,
    b_dtype: str | None = None,
    force: bool = False,
) -> CombineReport: ...

@final
class PatternRule:
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule over ``keys`` (in their order)."""

    def __new__(cls, keys: list[str], what: str = "pattern") -> PatternRule: ...
    def first_match(self, module: str) -> int | None: ...
    def __len__(self) -> int: ...

def cli_main(argv: list[str], python_commands: str = "") -> int: ...
