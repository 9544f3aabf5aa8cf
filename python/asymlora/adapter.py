"""Adapter files, format v1 (seed-plus-B); spec in ``docs/adapter-format-v1.md``.

Reading is memory-mapped and lazy: a tensor is copied out of the file only when
asked for. Validation (in the Rust core) happens on open and before any write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from asymlora import _native
from asymlora._dtypes import from_raw, numpy_to_safetensors
from asymlora._validate import check_finite, check_uint

PathLike = Union[str, "os.PathLike[str]"]

#: names of the scaling rules: ``s = alpha / r`` and ``s = alpha / sqrt(r)`` (rsLoRA)
SCALINGS: tuple[str, ...] = tuple(_native.SCALINGS)

#: what an adapted module is (how its matrix sits in the base tensor; see the format spec)
KINDS: tuple[str, ...] = tuple(_native.KINDS)


@dataclass(frozen=True)
class ModuleConfig:
    """One adapted matrix ``W (d_out x d_in) + s * B @ A`` (per expert for a 3-D parameter).

    ``stream`` selects this module's ``A`` under the adapter seed; it is stored
    in the file, so renaming modules never changes an ``A``. ``a_stored`` is true
    when ``A`` is in the file (trained or imported) instead of regenerated.
    ``rank``/``alpha`` override the adapter-wide values for this module.

    ``kind`` says how ``W`` sits in the base tensor: ``"linear"`` (``{module}.weight``
    is ``W``), ``"embedding"`` (``{module}.weight`` is ``W.T``, d_in = num_embeddings),
    ``"conv"`` (``{module}.weight.reshape(d_out, -1)`` is ``W``; ``kernel`` is the kernel
    size, d_in = c_in * prod(kernel)) or ``"parameter"`` (the parameter named
    ``{module}`` itself; with ``experts`` E it is ``[E, d_out, d_in]``, each expert with its
    own ``A`` on stream ``stream + e``; ``transposed``: each block stored d_in x d_out).
    Fields left at their default are not written, so a linear module's JSON is unchanged.
    """

    d_in: int
    d_out: int
    stream: int
    a_stored: bool = False
    rank: int | None = None
    alpha: float | None = None
    kind: str = "linear"
    kernel: tuple[int, ...] | None = None
    experts: int | None = None
    transposed: bool | None = None

    def __post_init__(self) -> None:
        if self.kernel is not None and not isinstance(self.kernel, tuple):
            object.__setattr__(self, "kernel", tuple(self.kernel))

    @property
    def blocks(self) -> int:
        """Number of ``(A, B)`` pairs: the experts of a 3-D parameter, else 1."""
        return 1 if self.experts is None else self.experts

    def a_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of ``{module}.lora_A`` at rank ``rank``: ``(E, r, d_in)`` with experts."""
        return (rank, self.d_in) if self.experts is None else (self.experts, rank, self.d_in)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of ``{module}.lora_B`` at rank ``rank``: ``(E, d_out, r)`` with experts."""
        return (self.d_out, rank) if self.experts is None else (self.experts, self.d_out, rank)

    def to_dict(self) -> dict[str, Any]:
        """The module's JSON object: defaults (and ``kind`` linear) left out."""
        data = {k: v for k, v in asdict(self).items() if v is not None}
        if data["kind"] == "linear":
            del data["kind"]
        if self.kernel is not None:
            data["kernel"] = list(self.kernel)
        return data

    def check(self, name: str) -> None:
        """Raises ``ValueError`` naming the module and field of a value JSON cannot hold
        as the format's type (an integer in ``[0, 2**64)``, a finite float). The format's
        rules (ranges, streams, shapes) are checked by the core when the adapter is
        written or read."""
        for field_name in ("d_in", "d_out", "stream"):
            check_uint(f"module {name!r}: {field_name}", getattr(self, field_name))
        for field_name in ("rank", "experts"):
            if getattr(self, field_name) is not None:
                check_uint(f"module {name!r}: {field_name}", getattr(self, field_name))
        for k in self.kernel or ():
            check_uint(f"module {name!r}: kernel", k)
        if self.kind not in KINDS:
            raise ValueError(
                f"module {name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}"
            )
        if self.alpha is not None:
            check_finite(f"module {name!r}: alpha", self.alpha)


@dataclass(frozen=True)
class AdapterConfig:
    """Adapter-wide settings and the per-module table (stored as JSON in the file)."""

    rank: int
    alpha: float
    seed: int
    modules: Mapping[str, ModuleConfig]
    scaling: str = SCALINGS[0]  # "alpha/r"
    generator: str = "haar-v1"
    a_dtype: str = "float32"
    a_gain: float = 1.0
    full_tensors: tuple[str, ...] = ()
    base_model: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        # Only what JSON needs to hold the format's types; the format's rules (rank >= 1,
        # a known scaling and generator, distinct streams, r <= d_in, ...) live in the
        # core, which checks them on every write and read and names the file.
        check_uint("config.rank", self.rank)
        check_finite("config.alpha", self.alpha)
        check_uint("config.seed", self.seed)
        check_finite("config.a_gain", self.a_gain)
        for name, module in self.modules.items():
            module.check(name)

    @property
    def rslora(self) -> bool:
        """Whether the scaling is rank-stabilised (``alpha / sqrt(r)``, PEFT's ``use_rslora``)."""
        return self.scaling == _native.scaling_name(True)

    def module_rank(self, module: str) -> int:
        m = self.modules[module]
        return self.rank if m.rank is None else m.rank

    def module_alpha(self, module: str) -> float:
        m = self.modules[module]
        return float(self.alpha if m.alpha is None else m.alpha)

    def scale(self, module: str) -> float:
        """The factor ``s`` in ``W + s * B @ A`` for ``module`` (the core's scaling rule).

        Raises:
            ValueError: ``scaling`` is not one of :data:`SCALINGS`.
        """
        return _native.scale(self.scaling, self.module_alpha(module), self.module_rank(module))

    def to_json(self) -> str:
        data = asdict(self)
        data["modules"] = {name: m.to_dict() for name, m in self.modules.items()}
        data["full_tensors"] = list(self.full_tensors)
        if self.base_model is None:
            del data["base_model"]
        return json.dumps(data, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        data = json.loads(text)
        modules = {
            name: ModuleConfig(**_module_fields(m)) for name, m in data.pop("modules").items()
        }
        data["full_tensors"] = tuple(data.get("full_tensors", ()))
        return cls(modules=modules, **data)


def _module_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A module's JSON object as ``ModuleConfig`` arguments (``null`` counts as absent)."""
    fields = {k: v for k, v in data.items() if v is not None}
    if "kernel" in fields:
        fields["kernel"] = tuple(fields["kernel"])
    return fields


class _LazyTensors(Mapping[str, np.ndarray]):
    """Tensors of an open adapter, read from the mapped file on access."""

    def __init__(self, native: _native.AdapterFile) -> None:
        self._native = native
        self._names = native.tensor_names()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        return from_raw(*self._native.tensor(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class Adapter:
    """An open, validated adapter file. Create with :func:`read_adapter`."""

    def __init__(self, path: PathLike) -> None:
        self._native = _native.AdapterFile(os.fspath(path))
        self.config: AdapterConfig = AdapterConfig.from_json(self._native.config_json)
        self.tensors: Mapping[str, np.ndarray] = _LazyTensors(self._native)

    @property
    def path(self) -> Path:
        return Path(self._native.path)

    @property
    def file_size(self) -> int:
        return self._native.file_size

    @property
    def classic_lora_size(self) -> int:
        """Bytes this adapter would take as a classic LoRA file (every ``A`` stored)."""
        return self._native.classic_lora_size

    @property
    def modules(self) -> list[str]:
        return list(self.config.modules)

    def lora_B(self, module: str) -> np.ndarray:
        """``B`` (d_out x r; ``(E, d_out, r)`` for a module with experts) of ``module``."""
        self._require(module)
        return self.tensors[f"{module}.lora_B"]

    def lora_A(self, module: str) -> np.ndarray:
        """``A`` (r x d_in; ``(E, r, d_in)`` for a module with experts) of ``module``:
        read from the file, or regenerated from the seed (expert ``e`` on stream
        ``stream + e``)."""
        self._require(module)
        return from_raw(*self._native.lora_a(module))

    def delta(self, module: str) -> np.ndarray:
        """``s * B @ A`` for ``module`` in float64 (for checks): d_out x d_in, or
        ``(E, d_out, d_in)`` for a module with experts (``B_e @ A_e`` per expert)."""
        a = self.lora_A(module).astype(np.float64)
        b = self.lora_B(module).astype(np.float64)
        return self.config.scale(module) * np.matmul(b, a)

    def inspect(self) -> str:
        """The report ``asymlora inspect`` prints."""
        return self._native.inspect()

    def _require(self, module: str) -> None:
        if module not in self.config.modules:
            raise KeyError(f"no module {module!r} in {self.path}")

    def __repr__(self) -> str:
        return f"Adapter({str(self.path)!r}, modules={len(self.config.modules)})"


def read_adapter(path: PathLike) -> Adapter:
    """Opens and validates an adapter file (memory-mapped; tensors load lazily).

    Raises:
        AdapterFormatError: the file is not a valid v1 adapter; the message names
            the module and field.
        FileNotFoundError: ``path`` does not exist.
    """
    return Adapter(path)


def write_adapter(path: PathLike, config: AdapterConfig, tensors: Mapping[str, Any]) -> None:
    """Validates ``config`` against ``tensors`` and writes the adapter atomically.

    ``tensors`` maps names (``{module}.lora_B``, ``{module}.lora_A`` where
    ``a_stored``, and the ``full_tensors``) to arrays of float64, float32, float16
    or ``ml_dtypes.bfloat16``. Nothing is written if validation fails.
    """
    raw = []
    for name, value in tensors.items():
        array = np.asarray(value, order="C")  # unlike ascontiguousarray, keeps 0-d shapes
        code = numpy_to_safetensors().get(array.dtype)
        if code is None:
            raise ValueError(
                f"tensor {name!r} has dtype {array.dtype}; adapters hold float64, float32, "
                "float16 or bfloat16"
            )
        raw.append((name, code, list(array.shape), array.tobytes()))
    _native.write_adapter(os.fspath(path), config.to_json(), raw)
