"""The torch layer: adapted modules, wrapping, merging (needs ``torch``)."""

from asymlora.nn.layer import LoraLayer
from asymlora.nn.wrap import (
    TrainableSummary,
    config_of,
    is_wrapped,
    lora_layers,
    merge,
    print_trainable_parameters,
    trainable_parameters,
    unmerge,
    unwrap,
    wrap,
)

__all__ = [
    "LoraLayer",
    "TrainableSummary",
    "config_of",
    "is_wrapped",
    "lora_layers",
    "merge",
    "print_trainable_parameters",
    "trainable_parameters",
    "unmerge",
    "unwrap",
    "wrap",
]
