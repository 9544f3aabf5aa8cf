"""The frozen base layer an adapter wraps, whatever stores its weight.

Everything the torch layer needs to know of a base layer lives here: whether it can be
adapted and why not, its shape, the dtype its adapter branch is kept in, its weight as a
float32 tensor, and how an adapter's delta is merged into it. The kinds:

=============  ===========================================  ==============================
kind           layers                                       in-memory merge
=============  ===========================================  ==============================
``float``      ``nn.Linear``, transformers ``Conv1D``       add in float32, round once
``bnb-4bit``   bitsandbytes ``Linear4bit`` (NF4, FP4)       dequantise, add, requantise
``bnb-8bit``   bitsandbytes ``Linear8bitLt`` (int8 weights) dequantise, add, requantise
``torchao``    ``nn.Linear`` with a torchao quantised       refused (the weight does not
               weight (``quantize_(model, Int8WeightOnly    record the config it was
               Config())`` and the like)                    quantised with)
=============  ===========================================  ==============================

Besides linear maps, float ``nn.Embedding`` and ``nn.Conv1d/2d/3d`` layers are bases (the
layer kinds :data:`LINEAR`, :data:`EMBEDDING`, :data:`CONV`). Each is seen as one matrix
``W`` (d_out x d_in) so that ``A`` (r x d_in) and ``B`` (d_out x r) mean the same
everywhere: an embedding's weight (num_embeddings x dim) is ``W`` transposed (d_in is
the vocabulary), a convolution's weight (c_out, c_in, *kernel) is ``W`` with its rows
unflattened (d_in = c_in * prod(kernel)). :func:`weight_layout` turns a ``W``-shaped
delta into the weight's own layout.

A requantised merge is not exact: ``W + s·B·A`` is rounded to the 4- or 8-bit grid again,
so the merged layer differs from the unmerged one by up to one quantisation step, and an
unmerge does not give back the original bits. The exact route is offline: ``asymlora
merge`` of the adapter into the float checkpoint.

bitsandbytes and torchao are optional: their classes are looked up without importing
them (:func:`~asymlora.nn.optional.loaded_class`), and their functions are imported only
to dequantise or requantise a layer of theirs, which means they are installed.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from asymlora.errors import QuantizedBaseError
from asymlora.nn.optional import loaded_class

FLOAT = "float"
BNB_4BIT = "bnb-4bit"
BNB_8BIT = "bnb-8bit"
TORCHAO = "torchao"

#: Layer kinds: how the matrix ``W`` (d_out x d_in) sits in the base weight. The names are
#: those adapter files record (``ModuleConfig.kind``).
LINEAR = "linear"
EMBEDDING = "embedding"
CONV = "conv"

#: What can be adapted, for error messages.
SUPPORTED = (
    "torch.nn.Linear, transformers Conv1D, bitsandbytes Linear4bit and Linear8bitLt, "
    "nn.Linear with a torchao quantised weight, nn.Embedding, nn.Conv1d/2d/3d"
)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Class names of quantised linear layers of other libraries (GPTQ, AWQ, HQQ, quanto,
# EETQ, AQLM, ...): refused by name, so the message says what they are.
_OTHER_QUANTIZED = (
    "QuantLinear",
    "WQLinear",
    "HQQLinear",
    "QLinear",
    "EetqLinear",
    "QuantizedLinear",
    "FP8Linear",
    "MarlinLinear",
)


@dataclass(frozen=True)
class BaseInfo:
    """What the adapter needs of one base layer."""

    #: :data:`FLOAT`, :data:`BNB_4BIT`, :data:`BNB_8BIT` or :data:`TORCHAO`
    kind: str
    d_in: int
    d_out: int
    #: True for transformers' Conv1D, whose weight is stored d_in x d_out
    fan_in_fan_out: bool
    #: the dtype frozen factors are kept in (trained ones: its master dtype)
    dtype: torch.dtype
    device: torch.device
    #: :data:`LINEAR`, :data:`EMBEDDING` or :data:`CONV`
    layer: str = LINEAR
    #: a convolution's kernel size (empty for the other kinds)
    kernel: tuple[int, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.kind != FLOAT


def describe(module: nn.Module) -> BaseInfo | str:
    """``module`` as a base layer, or why it cannot be one (a one-line reason)."""
    if isinstance(module, (nn.Embedding, *_CONVS)):
        return _describe_float_layer(module)
    kind = _kind(module)
    if kind is None:
        name = type(module).__name__
        if is_unsupported_quantized(module):
            return f"{name} is a quantised layer asymlora does not adapt (supported: {SUPPORTED})"
        return f"{name} is not supported (supported: {SUPPORTED})"
    weight = module.weight
    if kind == FLOAT and not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not a float dtype (supported: {SUPPORTED})"
    if kind == FLOAT and not isinstance(module, nn.Linear):  # Conv1D: weight is d_in x d_out
        d_in, d_out = weight.shape
        return BaseInfo(kind, d_in, d_out, True, weight.dtype, weight.device)
    return BaseInfo(
        kind, module.in_features, module.out_features, False, _dtype(module, kind), weight.device
    )


def _describe_float_layer(module: nn.Module) -> BaseInfo | str:
    # An embedding or a convolution: float weights only, and the forms whose delta is
    # one low-rank matrix the forward can add.
    weight = module.weight
    name = type(module).__name__
    if not weight.is_floating_point() or _weight_kind(weight) != FLOAT:
        return f"{name} with a {type(weight).__name__} {weight.dtype} weight is not supported"
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            # F.embedding renormalises the looked-up rows of its weight in place
            return f"{name} with max_norm={module.max_norm} is not supported"
        d_in, d_out = module.num_embeddings, module.embedding_dim
        return BaseInfo(FLOAT, d_in, d_out, False, weight.dtype, weight.device, EMBEDDING)
    if module.groups != 1:
        return (
            f"{name} with groups={module.groups} is not supported: the update of a grouped "
            "convolution is not one low-rank matrix (PEFT cannot merge it either)"
        )
    kernel = tuple(int(k) for k in module.kernel_size)
    d_in = module.in_channels * math.prod(kernel)
    return BaseInfo(
        FLOAT, d_in, module.out_channels, False, weight.dtype, weight.device, CONV, kernel
    )


def weight_layout(base: BaseInfo, delta: torch.Tensor) -> torch.Tensor:
    """A delta shaped like ``W`` (d_out x d_in) in the layout of ``base``'s weight."""
    if base.layer == CONV:
        c_in = base.d_in // math.prod(base.kernel)
        return delta.reshape(base.d_out, c_in, *base.kernel)
    if base.layer == EMBEDDING or base.fan_in_fan_out:
        return delta.t()
    return delta


def info(module: nn.Module) -> BaseInfo:
    """:func:`describe` of a module known to be a base layer (``ValueError`` if not)."""
    found = describe(module)
    if isinstance(found, str):
        raise ValueError(found)
    return found


def is_adaptable_linear(module: nn.Module) -> bool:
    """True for the linear layers ``target_modules="all-linear"`` selects: every storage
    kind of a linear map (not embeddings or convolutions, as in PEFT)."""
    return _kind(module) is not None


def is_unsupported_quantized(module: nn.Module) -> bool:
    """True for a quantised linear layer of a library asymlora does not adapt (GPTQ, AWQ,
    HQQ, quanto, EETQ, ...: named like one, or an ``nn.Linear`` with another library's
    quantised weight tensor)."""
    if _kind(module) is not None:
        return False
    return _named_quantized(module) or isinstance(module, nn.Linear)


def float_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as float32, laid out as stored (d_out x d_in; Conv1D and
    embeddings d_in x d_out; convolutions c_out x c_in x kernel)."""
    kind = info(module).kind
    weight = module.weight
    if kind == BNB_4BIT:
        return _dequantize_4bit(weight).float()
    if kind == BNB_8BIT:
        return _dequantize_8bit(module).float()
    if kind == TORCHAO:
        return weight.dequantize().float()
    return weight.detach().float()


@torch.no_grad()
def add_to_weight(module: nn.Module, delta: torch.Tensor, *, what: str = "merge") -> None:
    """``W += delta`` (float32, laid out like the weight) in ``module``'s own storage.

    Float weights: added in float32 and rounded once. bitsandbytes weights: dequantised,
    added and quantised again as they were (same quant type, block size, statistics),
    with a warning that this rounds. ``what`` names the operation in messages.

    Raises:
        QuantizedBaseError: the backend cannot requantise (torchao).
    """
    base = info(module)
    weight = module.weight
    if base.kind == FLOAT:
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        return
    if base.kind == TORCHAO:
        raise QuantizedBaseError(
            f"cannot {what} into {type(module).__name__} with a torchao "
            f"{type(weight).__name__} weight: the weight does not record the quantisation "
            "config to requantise with; merge offline into the float checkpoint "
            "(asymlora merge) or load the base in float to merge in memory"
        )
    warnings.warn(
        f"{what} into a {base.kind} base layer dequantises, adds and quantises again: the "
        "result differs from the float merge by up to one quantisation step, and unmerge "
        "does not restore the original bits (asymlora merge of the float checkpoint is exact)",
        stacklevel=3,
    )
    new = float_weight(module) + delta.to(weight.device)
    if base.kind == BNB_4BIT:
        _requantize_4bit(module, new)
    else:
        _requantize_8bit(module, new)


# --- kinds -----------------------------------------------------------------------------------


def _kind(module: nn.Module) -> str | None:
    linear4 = loaded_class("bitsandbytes.nn", "Linear4bit")
    if linear4 is not None and isinstance(module, linear4):
        return BNB_4BIT
    linear8 = loaded_class("bitsandbytes.nn", "Linear8bitLt")
    if linear8 is not None and isinstance(module, linear8):
        return BNB_8BIT
    if isinstance(module, nn.Linear):
        # Quantised layers of other libraries subclass nn.Linear too (quanto's QLinear)
        return None if _named_quantized(module) else _weight_kind(module.weight)
    conv1d = loaded_class("transformers.pytorch_utils", "Conv1D")  # GPT-2 style models
    if conv1d is not None and isinstance(module, conv1d):
        return FLOAT
    return None


def _weight_kind(weight: torch.Tensor) -> str | None:
    # torch's own tensors (Parameter, DTensor) are float weights; torchao's quantised
    # tensors dequantise; any other tensor subclass is a quantisation asymlora cannot read.
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    owner = type(data).__module__
    if owner == "torch" or owner.startswith("torch."):
        return FLOAT
    if owner.startswith("torchao") and hasattr(data, "dequantize"):
        return TORCHAO
    return None


def _named_quantized(module: nn.Module) -> bool:
    name = type(module).__name__
    return any(part in name for part in _OTHER_QUANTIZED) or hasattr(module, "qweight")


def _dtype(module: nn.Module, kind: str) -> torch.dtype:
    # The dtype the layer computes in: 4-bit layers say it (compute_dtype, set by
    # transformers' bnb_4bit_compute_dtype; None until the first forward otherwise),
    # 8-bit ones do not (they cast inputs to float16 themselves): there the float
    # parameters (a bias) tell the model's dtype, else float32.
    if kind == BNB_4BIT and module.compute_dtype is not None:
        return module.compute_dtype
    if kind in (FLOAT, TORCHAO):
        return module.weight.dtype  # a torchao tensor reports the dtype it stands for
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None and bias.is_floating_point() else torch.float32


# --- bitsandbytes ----------------------------------------------------------------------------


def _bnb_functional():
    # Only reached for a layer of bitsandbytes, so bitsandbytes is installed.
    return importlib.import_module("bitsandbytes.functional")


def _dequantize_4bit(weight: torch.Tensor) -> torch.Tensor:
    bnbf = _bnb_functional()
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights for its AVX-512 BF16 CPU kernel on the first
        # no-grad CPU forward; dequantize_4bit reads the standard layout only.
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
    return bnbf.dequantize_4bit(data, state)


def _dequantize_8bit(module: nn.Module) -> torch.Tensor:
    # The row scales sit on the weight until the first forward, then in the layer's state.
    weight = module.weight
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = module.state.SCB
    if scales is None:  # not quantised yet (has_fp16_weights or before .to(device))
        return weight.data
    return _bnb_functional().int8_vectorwise_dequant(weight.data, scales)


def _requantize_4bit(module: nn.Module, new: torch.Tensor) -> None:
    bnb_nn = importlib.import_module("bitsandbytes.nn")
    old = module.weight
    state = old.quant_state
    dtype = getattr(state, "dtype", None) or torch.float32
    fresh = bnb_nn.Params4bit(
        new.to("cpu", dtype),
        requires_grad=False,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        module=module,
    )
    module.weight = fresh.to(old.device)  # quantises on the move to a device


def _requantize_8bit(module: nn.Module, new: torch.Tensor) -> None:
    bnb_nn = importlib.import_module("bitsandbytes.nn")
    old = module.weight
    fresh = bnb_nn.Int8Params(
        new.to("cpu", torch.float16),
        requires_grad=False,
        has_fp16_weights=old.has_fp16_weights,
    )
    module.weight = fresh.to(old.device)  # quantises on the move to a device
    module.state.CB = None  # the layer takes the new scales from the weight on its next call
    module.state.SCB = None
