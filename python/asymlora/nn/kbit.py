"""Quantised (k-bit) models: quantising a float model's linear layers in place with
bitsandbytes (:func:`quantize_bnb`), and getting such a model ready to train adapters on
(PEFT's ``prepare_model_for_kbit_training``, with the same rules)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from asymlora.nn.base import describe


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Readies a model with quantised layers (bitsandbytes, torchao) for training an
    adapter, as PEFT's function of that name does; call it before :func:`asymlora.wrap`.

    - freezes every parameter (``wrap`` then makes the adapter's factors trainable);
    - casts float16/bfloat16 parameters that are not quantised weights (norms,
      embeddings, the head) to float32, for stable training in half precision (PEFT's
      rule; it costs their memory twice, so skip this function where that matters: a
      B-only adapter trains without it);
    - with ``use_gradient_checkpointing``, enables the model's gradient checkpointing
      (transformers' ``activation_checkpointing_enable``, ``gradient_checkpointing_enable``
      before transformers 5; ``gradient_checkpointing_kwargs`` go to it, default
      ``{"use_reentrant": True}`` as PEFT) and, for reentrant checkpointing, makes the
      input embeddings' output require grad: otherwise no checkpointed block sees an
      input that needs grad, and the adapters in it get none.

    Returns ``model`` itself.

    Raises:
        TypeError: ``use_gradient_checkpointing`` for a model without transformers'
            checkpointing methods.
    """
    quantized = {
        id(module.weight)
        for module in model.modules()
        if not isinstance(base := describe(module), str) and base.quantized
    }
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and id(param) not in quantized:
            param.data = param.data.float()
    if use_gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": True})
        if kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
        _enable_checkpointing(model, kwargs)
    return model


def _enable_checkpointing(model: nn.Module, kwargs: dict[str, Any]) -> None:
    # transformers 5 renamed it activation_checkpointing_enable (the old name warns)
    new = getattr(model, "activation_checkpointing_enable", None)
    if callable(new):
        new(activation_checkpointing_kwargs=kwargs)
        return
    old = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(old):
        raise TypeError(
            f"use_gradient_checkpointing: {type(model).__name__} has no "
            "gradient_checkpointing_enable (a transformers model has); pass False"
        )
    old(gradient_checkpointing_kwargs=kwargs)


def quantize_bnb(
    model: nn.Module,
    bits: int = 4,
    *,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    modules: Iterable[str] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Quantises ``model``'s ``nn.Linear`` layers in place with bitsandbytes, as
    transformers' ``BitsAndBytesConfig`` loader does for a checkpoint: each becomes a
    ``Linear4bit`` (``quant_type`` ``"nf4"`` or ``"fp4"``, ``compute_dtype``, by
    default the float weight's dtype, double
    quantisation of the statistics with ``double_quant``) or, with ``bits=8``, a
    ``Linear8bitLt`` (int8 weights, no float copy kept). The weights are quantised on
    ``device`` (default: where each layer is).

    ``modules``: the names of the layers to quantise; default every plain ``nn.Linear``
    but the output head (``get_output_embeddings``), which QLoRA keeps in float.
    Returns ``model``.

    Raises:
        ValueError: ``bits`` is not 4 or 8, or a name in ``modules`` is not an
            ``nn.Linear`` of ``model``.
        ModuleNotFoundError: bitsandbytes is not installed (``pip install asymlora[quantized]``).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits: {bits!r} is not 4 or 8")
    bnb_nn = importlib.import_module("bitsandbytes.nn")
    for name in _linear_names(model, modules):
        linear = model.get_submodule(name)
        layer = _bnb_layer(bnb_nn, linear, bits, quant_type, compute_dtype, double_quant)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to(device or linear.weight.device))
    return model


def _linear_names(model: nn.Module, modules: Iterable[str] | None) -> list[str]:
    if modules is None:
        head = getattr(model, "get_output_embeddings", lambda: None)()
        return [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    names = list(modules)
    wrong = [n for n in names if type(_submodule(model, n)) is not nn.Linear]
    if wrong:
        raise ValueError(f"modules: {wrong} are not nn.Linear layers of {type(model).__name__}")
    return names


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _bnb_layer(bnb_nn, linear: nn.Linear, bits: int, quant_type, compute_dtype, double_quant):
    # The float weight moves into the bitsandbytes parameter, which quantises itself on
    # its first move to a device (the caller's .to).
    bias = linear.bias is not None
    data = linear.weight.data.to("cpu")
    if bits == 4:
        layer = bnb_nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=compute_dtype or linear.weight.dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
        )
        layer.weight = bnb_nn.Params4bit(
            data,
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=quant_type,
            module=layer,
        )
    else:
        layer = bnb_nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False
        )
        layer.weight = bnb_nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)
    return layer
