"""Getting a quantised (k-bit) model ready to train adapters on: PEFT's
``prepare_model_for_kbit_training``, with the same rules, for asymlora."""

from __future__ import annotations

from collections.abc import Mapping
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
