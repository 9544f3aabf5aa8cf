"""Wrapping a model in place, merging its adapters into the weights, and unwrapping it."""

from __future__ import annotations

import warnings

from torch import nn

from asymlora.lora_config import LoraConfig
from asymlora.nn.distributed.ddp import exclude_frozen_factors_from_ddp
from asymlora.nn.distributed.fingerprint import check_layers, should_check
from asymlora.nn.factory import AdapterSpec, build_layer, initial_factors, install_layers
from asymlora.nn.layer import LoraLayer
from asymlora.nn.model import clear_config, is_wrapped, lora_layers, replace_module
from asymlora.nn.targets import Target, find_targets, modules_to_save


def wrap(
    model: nn.Module,
    config: LoraConfig,
    *,
    threads: int | None = None,
    check_ranks: bool | None = None,
) -> nn.Module:
    """Adds adapters to ``model`` in place and returns it.

    Every ``nn.Linear`` or transformers ``Conv1D`` selected by ``config.target_modules``
    becomes a :class:`LoraLayer`; all other parameters are frozen except those of
    ``config.modules_to_save``. Module ``i`` (in ``named_modules`` order) gets stream
    ``i``: its frozen ``A`` is ``random_orthogonal(r, d_in, seed=config.seed, stream=i)``.

    Under ``torch.distributed`` every rank regenerates the same ``A``; nothing about it
    is broadcast (frozen factors are on ``DistributedDataParallel``'s ignore list). With
    ``check_ranks`` (``None``: when a process group of more than one rank is
    initialised) all ranks first compare fingerprints of their config and frozen
    factors, a collective that every rank must reach (see :func:`asymlora.check_ranks`).

    Raises:
        ValueError: nothing matches, a match is not a supported layer, a rank exceeds
            a dimension, or the model is already wrapped. The model is left unchanged.
        DistributedMismatchError: ranks disagree (e.g. a different seed per rank); on
            every rank, the model left unchanged.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be an asymlora.LoraConfig, got {type(config).__name__}")
    if is_wrapped(model):
        raise ValueError("model is already wrapped; call asymlora.unwrap(model) first")
    targets = find_targets(model, config)
    saved = modules_to_save(model, config, {t.name for t in targets})
    layers = build_layers(targets, config, threads=threads)
    named = [(target.name, layer) for target, layer in zip(targets, layers)]
    if should_check(check_ranks):
        check_layers(named, config)
    # Everything is checked; from here on the model changes.
    install_layers(model, named, config)
    for module in saved:
        module.requires_grad_(True)
    return model


def build_layers(
    targets: list[Target], config: LoraConfig, *, threads: int | None = None
) -> list[LoraLayer]:
    """Adapter layers around each target's module, initialised per ``config``.

    Target ``i`` gets generator stream ``i``.
    """
    specs = [adapter_spec(target, stream, config) for stream, target in enumerate(targets)]
    factors = initial_factors(specs, config, threads=threads)
    return [build_layer(spec, a, b) for spec, (a, b) in zip(specs, factors)]


def adapter_spec(target: Target, stream: int, config: LoraConfig) -> AdapterSpec:
    """How ``config`` adapts ``target``, which gets generator stream ``stream``."""
    return AdapterSpec(
        target,
        rank=config.rank_for(target.name),
        scale=config.scale_for(target.name),
        stream=stream,
        train_A=config.train in ("A", "AB"),
        train_B=config.train in ("B", "AB"),
        a_regenerated=config.a_regenerable,
        dropout=config.dropout,
    )


def unwrap(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Puts plain modules back; with ``merge`` the adapters are merged into the weights first.

    With ``merge=False`` the adapters are dropped (merged ones are unmerged), giving the
    base model back; ``modules_to_save`` keep their trained values either way.
    """
    for name, layer in lora_layers(model):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        replace_module(model, name, layer.base_layer)
    clear_config(model)
    exclude_frozen_factors_from_ddp(model)  # takes the adapter's names off DDP's list
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """``W += s * B @ A`` in every adapted layer (float32, rounded once); returns ``model``.

    Forward then skips the adapter branch until :func:`unmerge_adapter`. PEFT's
    ``merge_adapter``; :func:`unwrap` merges and puts plain modules back.
    """
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undoes :func:`merge_adapter`: ``W -= s * B @ A`` (exact only as far as W's dtype allows)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge(model: nn.Module) -> nn.Module:
    """Deprecated alias of :func:`merge_adapter` (PEFT's name); removed in the next release."""
    _deprecated("merge", "merge_adapter")
    return merge_adapter(model)


def unmerge(model: nn.Module) -> nn.Module:
    """Deprecated alias of :func:`unmerge_adapter` (PEFT's name); removed in the next release."""
    _deprecated("unmerge", "unmerge_adapter")
    return unmerge_adapter(model)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"asymlora.{old} is deprecated and will be removed in the next release; "
        f"use asymlora.{new} (PEFT's name)",
        DeprecationWarning,
        stacklevel=3,  # the caller of the alias
    )
