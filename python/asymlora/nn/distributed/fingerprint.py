"""The rank check: every rank must hold the same frozen adapter factors.

Each rank regenerates its frozen ``A`` from (seed, stream) instead of receiving it, so
a rank with another seed, config, model or software version would silently train a
different adapter. A 64-bit fingerprint of the config and of every frozen factor's
bits is gathered from all ranks; a mismatch raises
:class:`asymlora.DistributedMismatchError` on every rank, naming the likely cause.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import asymlora
from asymlora.errors import DistributedMismatchError
from asymlora.lora_config import LoraConfig
from asymlora.nn.distributed.dtensor import full_tensor
from asymlora.nn.distributed.process import is_distributed, unwrap_parallel, world_size
from asymlora.nn.layer import DEFAULT_ADAPTER, LoraLayer
from asymlora.nn.model import config_of, lora_layers
from asymlora.nn.tensors import to_numpy


def adapter_fingerprint(model: nn.Module) -> int:
    """A 64-bit fingerprint of a wrapped model's config and frozen adapter factors.

    It covers the :class:`LoraConfig` and, per adapted module, its name, stream, rank,
    shape, scale and the exact bits of every frozen factor (``A`` for ``train="B"``):
    equal fingerprints mean (barring a 1 in 2**64 collision) that two processes compute
    the same adapter branch from the same ``B``. Trained factors and base weights are
    not covered. Computed on CPU (frozen factors are copied to the host); the same on
    every process and machine for the same model, config and factors.
    """
    model = unwrap_parallel(model)
    return _Fingerprint.of(lora_layers(model), config_of(model)).value


def check_ranks(model: nn.Module, *, group: dist.ProcessGroup | None = None) -> int:
    """Checks that every rank of ``group`` holds the same frozen adapter factors.

    A collective: every rank of the group must call it. :func:`asymlora.wrap` runs it
    by default under an initialised process group; call it yourself after
    :func:`asymlora.load_adapter` when every rank loads an adapter before training.

    Returns:
        The common :func:`adapter_fingerprint`.

    Raises:
        DistributedMismatchError: on every rank, naming the ranks that differ and the
            likely cause (a different seed, config, model or software version).
        RuntimeError: no process group is initialised.
    """
    model = unwrap_parallel(model)
    return check_layers(lora_layers(model), config_of(model), group=group)


def check_layers(
    layers: Sequence[tuple[str, LoraLayer]],
    config: LoraConfig,
    *,
    group: dist.ProcessGroup | None = None,
) -> int:
    """:func:`check_ranks` for adapter layers that are built but not yet in a model."""
    if not is_distributed():
        raise RuntimeError(
            "checking ranks needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group)"
        )
    mine = _Fingerprint.of(layers, config)
    prints: list[_Fingerprint] = [mine] * dist.get_world_size(group)
    dist.all_gather_object(prints, mine, group=group)
    if len({p.value for p in prints}) > 1:
        raise DistributedMismatchError(_mismatch_message(prints))
    return mine.value


def should_check(check_ranks: bool | None) -> bool:
    """Resolves a ``check_ranks`` argument: ``None`` means "when a process group is up".

    Raises:
        RuntimeError: ``check_ranks=True`` outside a distributed job.
    """
    if check_ranks is None:
        return world_size() > 1
    if check_ranks and not is_distributed():
        raise RuntimeError(
            "check_ranks=True needs an initialised torch.distributed process group; "
            "call torch.distributed.init_process_group first or pass check_ranks=None"
        )
    return bool(check_ranks)


@dataclass(frozen=True)
class _ModulePrint:
    name: str
    header: str  # stream, rank, shape, scale, trained factors, frozen dtypes
    digest: str  # hex of the 64-bit hash of header and frozen bits

    @classmethod
    def of(cls, name: str, layer: LoraLayer) -> _ModulePrint:
        adapters = layer.adapter_names
        headers = []
        digest = hashlib.blake2b(digest_size=8, person=b"asymlora-module")
        for adapter in adapters:
            view = layer.adapter(adapter)
            frozen = view.frozen_factors()
            dtypes = ", ".join(f"{n} {str(b.dtype).removeprefix('torch.')}" for n, b in frozen)
            header = (
                f"stream {view.stream}, rank {view.rank}, {layer.d_out}x{layer.d_in}, "
                f"scale {view.scale!r}, trained {view.trained_factors()}, "
                f"regenerated A {view.a_regenerated}, frozen {dtypes or 'none'}"
            )
            if adapters != [DEFAULT_ADAPTER]:  # a one-adapter layer prints as it always did
                header = f"adapter {adapter!r}: {header}"
            headers.append(header)
            digest.update(header.encode())
            for _, buffer in frozen:
                digest.update(to_numpy(full_tensor(buffer)).tobytes())
        return cls(name, "; ".join(headers), digest.hexdigest())


@dataclass(frozen=True)
class _Fingerprint:
    """What one rank sends: its fingerprint and enough detail to explain a mismatch."""

    value: int
    seed: int
    config: str
    modules: tuple[_ModulePrint, ...]
    versions: str

    @classmethod
    def of(cls, layers: Sequence[tuple[str, LoraLayer]], config: LoraConfig) -> _Fingerprint:
        modules = tuple(_ModulePrint.of(name, layer) for name, layer in layers)
        total = hashlib.blake2b(digest_size=8, person=b"asymlora-ranks")
        total.update(repr(config).encode())
        for m in modules:
            total.update(f"\n{m.name}\n{m.header}\n{m.digest}".encode())
        versions = f"asymlora {asymlora.__version__}, torch {torch.__version__}"
        value = int.from_bytes(total.digest(), "little")
        return cls(value, config.seed, repr(config), modules, versions)


def _mismatch_message(prints: Sequence[_Fingerprint]) -> str:
    groups: dict[int, list[int]] = {}
    for rank, p in enumerate(prints):
        groups.setdefault(p.value, []).append(rank)
    lines = [
        f"the {len(prints)} ranks hold different frozen adapter factors; each rank "
        "regenerates A from the seed instead of receiving it, so they must agree:"
    ]
    for value, ranks in groups.items():
        p = prints[ranks[0]]
        lines.append(
            f"  {_ranks(ranks)}: fingerprint {value:016x}, seed {p.seed}, "
            f"{len(p.modules)} adapted modules"
        )
    reference = prints[0]
    for value, ranks in groups.items():
        if value != reference.value:
            lines.append(f"  {_ranks(ranks)} vs rank 0: {_cause(reference, prints[ranks[0]])}")
    return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _cause(ref: _Fingerprint, other: _Fingerprint) -> str:
    if ref.seed != other.seed:
        return (
            f"seed {other.seed} != {ref.seed}; the likely cause is a LoraConfig.seed that "
            "differs per rank (e.g. derived from the rank): pass the same seed everywhere"
        )
    if ref.config != other.config:
        return f"the LoraConfig differs: {other.config} != {ref.config}"
    mine = {m.name: m for m in other.modules}
    theirs = {m.name: m for m in ref.modules}
    if set(mine) != set(theirs):
        only_here = sorted(set(mine) - set(theirs))[:3]
        only_ref = sorted(set(theirs) - set(mine))[:3]
        return (
            f"different modules were adapted (only here {only_here}, only on rank 0 "
            f"{only_ref}): the models differ"
        )
    for name, m in mine.items():
        cause = _module_cause(name, m, theirs[name], ref, other)
        if cause:
            return cause
    return "the module order differs: the models differ"


def _module_cause(
    name: str, m: _ModulePrint, ref_m: _ModulePrint, ref: _Fingerprint, other: _Fingerprint
) -> str | None:
    if m.header != ref_m.header:
        return f"{name} differs: {m.header} != {ref_m.header}: the models differ"
    if m.digest == ref_m.digest:
        return None
    if other.versions != ref.versions:
        return (
            f"{name}: the frozen factor differs bit-wise under the same config; the "
            f"ranks run {other.versions} vs {ref.versions}: use the same everywhere"
        )
    return (
        f"{name}: the frozen factor differs bit-wise under the same config and "
        f"software ({ref.versions}): was it changed after wrapping?"
    )
