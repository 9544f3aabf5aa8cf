"""This process and this model as a parallel job sees them: the rank, the wrappers."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from asymlora.nn.optional import loaded_class


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and its default process group is up."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on global rank 0, and in a process that is not part of a distributed job."""
    return not is_distributed() or dist.get_rank() == 0


def world_size() -> int:
    """Ranks in the default process group; 1 outside a distributed job."""
    return dist.get_world_size() if is_distributed() else 1


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` (FSDP2's ``fully_shard`` works in place)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def model_class(model: nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps in a subclass ``FSDP<Name>``."""
    fsdp_module = loaded_class("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is None:  # FSDP2 never ran here (or torch has none)
        return type(model)
    return next(c for c in type(model).__mro__ if not issubclass(c, fsdp_module))
