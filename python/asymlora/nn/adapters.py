"""Several named adapters on one base model: which one is active, deleting one, running
without any, and a different adapter per row of a batch.

A model gets its adapters from :func:`asymlora.wrap` and :func:`asymlora.load_adapter`
(with ``adapter_name``); PEFT's words are used where PEFT has them. See
``docs/multi-adapter.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from asymlora.nn.distributed.ddp import exclude_frozen_factors_from_ddp
from asymlora.nn.experts import check_no_parameter_layers, remove_layer
from asymlora.nn.factory import uninstall_layers
from asymlora.nn.layer import LoraLayer, Route
from asymlora.nn.model import (
    activate,
    active_adapter,
    adapter_configs,
    check_adapter,
    config_of,
    lora_layers,
    remove_config,
)
from asymlora.nn.routing import ALGORITHMS, DisabledRoute, PerSampleRoute

__all__ = [
    "active_adapter",
    "delete_adapter",
    "disable_adapters",
    "list_adapters",
    "per_sample_adapters",
    "set_adapter",
]


def list_adapters(model: nn.Module) -> list[str]:
    """The names of a wrapped model's adapters, in the order they were added.

    Raises:
        ValueError: ``model`` is not wrapped.
    """
    config_of(model)
    return list(adapter_configs(model))


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Makes ``adapter_name`` the active adapter: the one forward adds (in the layers that
    hold it; the others give their base output) and the one trained (only its trained
    factors require grad). Also the default of :func:`asymlora.save_adapter`.

    Raises:
        ValueError: no adapter of that name; another adapter is merged (unmerge first);
            called inside ``disable_adapters`` or ``per_sample_adapters``.
    """
    check_adapter(model, adapter_name)
    _check_free(model, "set_adapter")
    merged = _merged(model)
    if merged is not None and merged != adapter_name:
        raise ValueError(
            f"adapter {merged!r} is merged into the weights; call "
            f"asymlora.unmerge_adapter(model) before set_adapter(model, {adapter_name!r})"
        )
    activate(model, adapter_name)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Removes adapter ``adapter_name`` from ``model``; returns the model.

    Layers left without any adapter become their plain base modules again. When the
    active adapter is deleted, the first remaining one becomes active. Deleting the last
    adapter unwraps the model (as ``asymlora.unwrap(model, merge=False)``).

    Raises:
        ValueError: no adapter of that name; it is merged (unmerge first); called inside
            ``disable_adapters`` or ``per_sample_adapters``.
    """
    check_adapter(model, adapter_name)
    _check_free(model, "delete_adapter")
    if _merged(model) == adapter_name:
        raise ValueError(
            f"adapter {adapter_name!r} is merged into the weights; call "
            "asymlora.unmerge_adapter(model) before deleting it"
        )
    if list(adapter_configs(model)) == [adapter_name]:
        uninstall_layers(model, merge=False)
        return model
    for name, layer in lora_layers(model):
        if layer.has_adapter(adapter_name):
            layer.remove_adapter(adapter_name)
            if not layer.adapter_names:
                remove_layer(model, name, layer)
    remove_config(model, adapter_name)
    activate(model, active_adapter(model))
    exclude_frozen_factors_from_ddp(model)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every adapted layer gives its base layer's output: the base
    model (``modules_to_save`` excepted: they are trained in place). PEFT's
    ``disable_adapter``.

    Raises:
        ValueError: an adapter is merged (unmerge first), or ``model`` is not wrapped.
    """
    config_of(model)
    merged = _merged(model)
    if merged is not None:
        raise ValueError(
            f"adapter {merged!r} is merged into the weights; call "
            "asymlora.unmerge_adapter(model) before disable_adapters"
        )
    with _routed(model, DisabledRoute()):
        yield model


@contextmanager
def per_sample_adapters(
    model: nn.Module, names: Sequence[str | None], *, algorithm: str = "gather"
) -> Iterator[nn.Module]:
    """Within the block, row ``i`` of every batch goes through adapter ``names[i]``
    (``None``: the base model), in every adapted layer: a mixed batch, around
    ``model(...)`` or ``model.generate(...)``.

    Each layer computes ``x A^T`` once per distinct ``A`` (once for the whole batch when
    the adapters share their regenerated ``A``) and adds each row's ``s (x A^T) B^T``.
    ``algorithm`` picks how the ``B`` are applied: ``"gather"`` (per-row ``B`` gathered
    from a stack, one batched matmul) or ``"grouped"`` (one matmul per adapter on its
    rows). For inference only: a forward with grad enabled raises while a factor in use
    requires grad (``model.generate`` runs without grad; else use ``torch.no_grad()``).
    Every layer must see batches of ``len(names)`` rows: for ``generate`` with
    ``num_beams`` or ``num_return_sequences`` ``k > 1`` repeat each name ``k`` times
    (``[n for n in names for _ in range(k)]``). The factors are read once per block.

    Raises:
        ValueError: an unknown adapter name, an empty ``names``, an adapter is merged,
            the model has adapted parameters (``target_parameters``: their update is
            in the weight every row uses, as PEFT refuses too), or (at forward) a batch
            whose size is not ``len(names)``.
    """
    config_of(model)
    check_no_parameter_layers(model, "per_sample_adapters")
    names = _checked_names(model, names)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    merged = _merged(model)
    if merged is not None:
        raise ValueError(
            f"adapter {merged!r} is merged into the weights, which a mixed batch cannot "
            "undo per row; call asymlora.unmerge_adapter(model) before per_sample_adapters"
        )
    with _routed(model, PerSampleRoute(names, algorithm)):
        yield model


def _checked_names(model: nn.Module, names: Sequence[str | None]) -> list[str | None]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(
            "names must be a list with one adapter name (or None) per batch row, "
            f"got {type(names).__name__}"
        )
    names = list(names)
    if not names:
        raise ValueError("names is empty; give one adapter name (or None) per batch row")
    known = adapter_configs(model)
    for i, name in enumerate(names):
        if name is not None and name not in known:
            raise ValueError(
                f"names[{i}] = {name!r} is not an adapter of the model; its adapters: "
                f"{list(known)} (None: the base model)"
            )
    return names


@contextmanager
def _routed(model: nn.Module, route: Route) -> Iterator[None]:
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.set_route(route) for layer in layers]
    try:
        yield
    finally:
        for layer, before in zip(layers, previous):
            layer.set_route(before)


def _merged(model: nn.Module) -> str | None:
    return next((layer.merged_adapter for layer in _layers(model) if layer.merged), None)


def _layers(model: nn.Module) -> list[LoraLayer]:
    return [layer for _, layer in lora_layers(model)]


def _check_free(model: nn.Module, what: str) -> None:
    if any(layer.route is not None for layer in _layers(model)):
        raise ValueError(
            f"{what} inside disable_adapters or per_sample_adapters; leave the block first"
        )
