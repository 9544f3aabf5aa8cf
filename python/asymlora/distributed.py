"""``torch.distributed``: the same ``A`` on every rank, never broadcast; sharded ``B`` saved whole.

Every rank regenerates its frozen ``A`` from (seed, stream) instead of receiving it, so
a data-parallel job moves only ``B`` (and its gradients). This module

- checks that all ranks really hold the same frozen factors (:func:`check_ranks`, run by
  :func:`asymlora.wrap` under an initialised process group): a 64-bit fingerprint of the
  config and of every frozen factor's bits is gathered from all ranks, and a mismatch
  raises :class:`asymlora.DistributedMismatchError` on every rank;
- tells ``DistributedDataParallel`` to leave the frozen factors alone (no broadcast at
  construction, none before each forward), the way DDP's own
  ``_set_params_and_buffers_to_ignore_for_model`` does;
- gathers FSDP2-sharded (``DTensor``) factors for :func:`asymlora.save_adapter`, which
  then writes on rank 0 only, and scatters loaded ones for :func:`asymlora.load_adapter`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from asymlora.errors import DistributedMismatchError
from asymlora.lora_config import LoraConfig
from asymlora.nn.layer import LoraLayer
from asymlora.nn.tensors import to_numpy
from asymlora.nn.wrap import config_of, lora_layers

#: model attribute listing the frozen-factor names asymlora added to DDP's ignore list
_DDP_IGNORED_ATTR = "_asymlora_ddp_ignored"
#: the attribute ``DistributedDataParallel`` reads on the module it wraps
_DDP_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and its default process group is up."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on global rank 0, and in a process that is not part of a distributed job."""
    return not is_distributed() or dist.get_rank() == 0


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` (FSDP2's ``fully_shard`` works in place)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def model_class(model: nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps in a subclass ``FSDP<Name>``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return type(model)
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


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
    """Resolves a ``check_ranks`` argument: ``None`` means "when a process group is up"."""
    if check_ranks is None:
        return is_distributed() and dist.get_world_size() > 1
    if check_ranks and not is_distributed():
        raise RuntimeError(
            "check_ranks=True needs an initialised torch.distributed process group; "
            "call torch.distributed.init_process_group first or pass check_ranks=None"
        )
    return bool(check_ranks)


def exclude_frozen_factors_from_ddp(model: nn.Module) -> list[str]:
    """Puts every frozen adapter factor of ``model`` on DDP's ignore list; returns the names.

    ``DistributedDataParallel`` broadcasts all parameters and buffers from rank 0 when
    it is built, and all buffers again before every forward. A frozen factor is a
    buffer that each rank builds itself, so it is listed in the module attribute that
    DDP reads (``_ddp_params_and_buffers_to_ignore``, set as DDP's
    ``_set_params_and_buffers_to_ignore_for_model`` does), next to names the user put
    there. Called by :func:`asymlora.wrap`, :func:`asymlora.load_adapter` and
    :func:`asymlora.unwrap` (which takes the names off again); it affects DDP built on
    ``model`` itself, not on a module that contains it.
    """
    ours = [
        f"{name}.{buffer}"
        for name, layer in lora_layers(model)
        for buffer, _ in layer.named_buffers(recurse=False)
        if buffer in ("lora_A", "lora_B")
    ]
    before = set(getattr(model, _DDP_IGNORED_ATTR, ()))
    kept = [n for n in getattr(model, _DDP_IGNORE_ATTR, ()) if n not in before]
    names = kept + [n for n in ours if n not in kept]
    if names:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, names
        )
    elif hasattr(model, _DDP_IGNORE_ATTR):
        delattr(model, _DDP_IGNORE_ATTR)
    if ours:
        setattr(model, _DDP_IGNORED_ATTR, tuple(ours))
    elif hasattr(model, _DDP_IGNORED_ATTR):
        delattr(model, _DDP_IGNORED_ATTR)
    return ours


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or the whole of a ``DTensor`` (FSDP2 shard); gathering is collective."""
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.full_tensor()
    return tensor


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` for a plain or a ``DTensor`` target and a whole ``value``.

    For a ``DTensor`` each rank copies its own part of ``value`` (every rank holds all
    of it, read from the same file), so nothing is communicated.
    """
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(target, dtensor):
        from torch.distributed.tensor import distribute_tensor

        local = target.to_local()
        value = distribute_tensor(
            value.to(device=local.device, dtype=local.dtype),
            target.device_mesh,
            target.placements,
            src_data_rank=None,
        )
    with torch.no_grad():
        target.copy_(value)


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing can be sharded
        return None
    return DTensor


@dataclass(frozen=True)
class _Module:
    name: str
    header: str  # stream, rank, shape, scale, trained factors, frozen dtypes
    digest: str  # hex of the 64-bit hash of header and frozen bits


@dataclass(frozen=True)
class _Fingerprint:
    """What one rank sends: its fingerprint and enough detail to explain a mismatch."""

    value: int
    seed: int
    config: str
    modules: tuple[_Module, ...]
    versions: str

    @classmethod
    def of(cls, layers: Sequence[tuple[str, LoraLayer]], config: LoraConfig) -> _Fingerprint:
        modules = tuple(_module_print(name, layer) for name, layer in layers)
        total = hashlib.blake2b(digest_size=8, person=b"asymlora-ranks")
        total.update(repr(config).encode())
        for m in modules:
            total.update(f"\n{m.name}\n{m.header}\n{m.digest}".encode())
        import asymlora

        versions = f"asymlora {asymlora.__version__}, torch {torch.__version__}"
        return cls(
            int.from_bytes(total.digest(), "little"), config.seed, repr(config), modules, versions
        )


def _module_print(name: str, layer: LoraLayer) -> _Module:
    frozen = [(n, b) for n, b in layer.named_buffers(recurse=False) if n in ("lora_A", "lora_B")]
    header = (
        f"stream {layer.stream}, rank {layer.rank}, {layer.d_out}x{layer.d_in}, "
        f"scale {layer.scale!r}, trained {layer._trained_factors()}, "
        f"regenerated A {layer.a_regenerated}, frozen "
        + (", ".join(f"{n} {str(b.dtype).removeprefix('torch.')}" for n, b in frozen) or "none")
    )
    digest = hashlib.blake2b(digest_size=8, person=b"asymlora-module")
    digest.update(header.encode())
    for _, buffer in frozen:
        digest.update(to_numpy(full_tensor(buffer)).tobytes())
    return _Module(name, header, digest.hexdigest())


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
        ref_m = theirs[name]
        if m.header != ref_m.header:
            return f"{name} differs: {m.header} != {ref_m.header}: the models differ"
        if m.digest != ref_m.digest and other.versions != ref.versions:
            return (
                f"{name}: the frozen factor differs bit-wise under the same config; the "
                f"ranks run {other.versions} vs {ref.versions}: use the same everywhere"
            )
        if m.digest != ref_m.digest:
            return (
                f"{name}: the frozen factor differs bit-wise under the same config and "
                f"software ({ref.versions}): was it changed after wrapping?"
            )
    return "the module order differs: the models differ"
