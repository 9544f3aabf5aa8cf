"""The torch layer: adapted modules, wrapping, merging (needs ``torch``).

Modules, by job (each imports only those above it in this list):

- ``layer``: :class:`LoraLayer`, one adapted linear layer;
- ``tensors``: numpy <-> torch, bfloat16 bits kept;
- ``optional``: classes of optional libraries, looked up without importing them;
- ``model``: a wrapped model's config, adapted layers and parameter counts;
- ``targets``: which modules a LoraConfig selects and can be adapted;
- ``distributed``: rank check, DDP ignore list, FSDP2 gather and scatter;
- ``factory``: builds each adapted layer and installs the layers into a model;
- ``wrap``: :func:`wrap`, :func:`unwrap`, :func:`merge_adapter`, :func:`unmerge_adapter`;
- ``serialization``: :func:`~asymlora.save_adapter`, :func:`~asymlora.load_adapter`.
"""

from asymlora.nn.layer import LoraLayer
from asymlora.nn.model import (
    TrainableSummary,
    config_of,
    is_wrapped,
    lora_layers,
    print_trainable_parameters,
    trainable_parameters,
)
from asymlora.nn.wrap import merge, merge_adapter, unmerge, unmerge_adapter, unwrap, wrap

__all__ = [
    "LoraLayer",
    "TrainableSummary",
    "config_of",
    "is_wrapped",
    "lora_layers",
    "merge",
    "merge_adapter",
    "print_trainable_parameters",
    "trainable_parameters",
    "unmerge",
    "unmerge_adapter",
    "unwrap",
    "wrap",
]
