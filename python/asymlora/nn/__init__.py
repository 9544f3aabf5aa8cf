"""The torch layer: adapted modules, wrapping, merging (needs ``torch``).

Modules, by job (each imports only those above it in this list):

- ``tensors``: numpy <-> torch, bfloat16 bits kept;
- ``optional``: classes of optional libraries, looked up without importing them;
- ``base``: the frozen base layer, float or quantised (bitsandbytes, torchao): its shape,
  dtype, weight as float and in-memory merge;
- ``layer``: :class:`LoraLayer`, one adapted linear layer with one or more named adapters;
- ``model``: a wrapped model's config, adapted layers and parameter counts;
- ``targets``: which modules a LoraConfig selects and can be adapted;
- ``kbit``: :func:`quantize_bnb` (quantise linear layers in place) and
  :func:`prepare_model_for_kbit_training` (PEFT's helper for quantised models);
- ``routing``: what the layers compute inside ``disable_adapters`` / ``per_sample_adapters``;
- ``distributed``: rank check, DDP ignore list, FSDP2 gather and scatter;
- ``experts``: ``target_parameters``: :class:`ParamLoraLayer` (one adapted 2-D or 3-D
  parameter, e.g. MoE experts) inside a :class:`ParametersWrapper` around its owner;
- ``factory``: builds each adapted layer and installs the layers into a model;
- ``adapters``: several adapters on one model: :func:`set_adapter`, :func:`list_adapters`,
  :func:`delete_adapter`, :func:`disable_adapters`, :func:`per_sample_adapters`;
- ``wrap``: :func:`wrap`, :func:`unwrap`, :func:`merge_adapter`, :func:`unmerge_adapter`;
- ``serialization``: :func:`~asymlora.save_adapter`, :func:`~asymlora.load_adapter`.
"""

from asymlora.nn.adapters import (
    delete_adapter,
    disable_adapters,
    list_adapters,
    per_sample_adapters,
    set_adapter,
)
from asymlora.nn.experts import ParametersWrapper, ParamLoraLayer
from asymlora.nn.kbit import prepare_model_for_kbit_training, quantize_bnb
from asymlora.nn.layer import DEFAULT_ADAPTER, AdapterView, LoraLayer
from asymlora.nn.model import (
    TrainableSummary,
    active_adapter,
    config_of,
    is_wrapped,
    lora_layers,
    print_trainable_parameters,
    trainable_parameters,
)
from asymlora.nn.wrap import merge, merge_adapter, unmerge, unmerge_adapter, unwrap, wrap

__all__ = [
    "DEFAULT_ADAPTER",
    "AdapterView",
    "LoraLayer",
    "ParamLoraLayer",
    "ParametersWrapper",
    "TrainableSummary",
    "active_adapter",
    "config_of",
    "delete_adapter",
    "disable_adapters",
    "is_wrapped",
    "list_adapters",
    "lora_layers",
    "merge",
    "merge_adapter",
    "per_sample_adapters",
    "prepare_model_for_kbit_training",
    "print_trainable_parameters",
    "quantize_bnb",
    "set_adapter",
    "trainable_parameters",
    "unmerge",
    "unmerge_adapter",
    "unwrap",
    "wrap",
]
