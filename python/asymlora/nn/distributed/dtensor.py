"""Sharded (``DTensor``, as FSDP2 leaves them) factors: gathered to save, scattered to load."""

from __future__ import annotations

import torch

from asymlora.nn.optional import loaded_class

#: the torch module that defines ``DTensor`` (slow to import: looked up, never imported)
DTENSOR_MODULE = "torch.distributed.tensor"


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (a sharded or replicated tensor)."""
    dtensor = loaded_class(DTENSOR_MODULE, "DTensor")
    return dtensor is not None and isinstance(tensor, dtensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or the whole of a ``DTensor`` (FSDP2 shard); gathering is collective."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` for a plain or a ``DTensor`` target and a whole ``value``.

    For a ``DTensor`` each rank copies its own part of ``value`` (every rank holds all
    of it, read from the same file), so nothing is communicated.
    """
    if is_dtensor(target):
        value = _distributed_like(target, value)
    with torch.no_grad():
        target.copy_(value)


def _distributed_like(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    distribute_tensor = loaded_class(DTENSOR_MODULE, "distribute_tensor")
    local = target.to_local()
    return distribute_tensor(
        value.to(device=local.device, dtype=local.dtype),
        target.device_mesh,
        target.placements,
        src_data_rank=None,  # every rank holds the whole value: take this rank's part
    )
