"""Wrapping a model in place (or adding a named adapter to a wrapped one), merging its
active adapter into the weights, and unwrapping it."""

from __future__ import annotations

import warnings

from torch import nn

from asymlora.lora_config import LoraConfig
from asymlora.nn.distributed.fingerprint import check_layers, should_check
from asymlora.nn.experts import expert_count, find_all_targets, stream_width
from asymlora.nn.factory import (
    AdapterSpec,
    a_identity,
    build_layer,
    check_can_add,
    initial_factors,
    install_layers,
    known_a,
    uninstall_layers,
)
from asymlora.nn.layer import DEFAULT_ADAPTER, LoraLayer, check_adapter_name
from asymlora.nn.model import active_adapter, is_wrapped, lora_layers
from asymlora.nn.targets import Target, modules_to_save


def wrap(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str | None = None,
    *,
    threads: int | None = None,
    check_ranks: bool | None = None,
) -> nn.Module:
    """Adds adapters to ``model`` in place and returns it.

    Without ``adapter_name`` the model must not be wrapped yet, and gets the adapter
    ``"default"``. With ``adapter_name``, a plain model gets that adapter (active); a
    wrapped model gets one more adapter of that name (not active: see
    :func:`asymlora.set_adapter`), with its own targets, ranks and seed. Its frozen
    ``A`` of a module is the buffer another adapter already holds there when both are
    the generator's same output (same seed and stream, rank, dtype): memory only for
    its ``B``.

    Every ``nn.Linear`` or transformers ``Conv1D`` selected by ``config.target_modules``
    becomes a :class:`LoraLayer`, and every parameter selected by
    ``config.target_parameters`` gets a :class:`~asymlora.nn.experts.ParamLoraLayer`
    (see ``docs/experts.md``); all other parameters are frozen except those of
    ``config.modules_to_save``. Module ``i`` (in ``named_modules`` order, the adapted
    parameters after the modules) gets stream ``i``: its frozen ``A`` is
    ``random_orthogonal(r, d_in, seed=config.seed, stream=i)``; a 3-D parameter of ``E``
    experts takes streams ``i .. i + E - 1``, one per expert.

    Under ``torch.distributed`` every rank regenerates the same ``A``; nothing about it
    is broadcast (frozen factors are on ``DistributedDataParallel``'s ignore list). With
    ``check_ranks`` (``None``: when a process group of more than one rank is
    initialised) all ranks first compare fingerprints of their config and frozen
    factors, a collective that every rank must reach (see :func:`asymlora.check_ranks`).

    Raises:
        ValueError: nothing matches, a match is not a supported layer, a rank exceeds
            a dimension, the model is already wrapped (no ``adapter_name``), the name
            is taken or cannot name a module, or modules_to_save would meet a second
            adapter. The model is left unchanged.
        DistributedMismatchError: ranks disagree (e.g. a different seed per rank); on
            every rank, the model left unchanged.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be an asymlora.LoraConfig, got {type(config).__name__}")
    adding = adapter_name is not None and is_wrapped(model)
    name = DEFAULT_ADAPTER if adapter_name is None else check_adapter_name(adapter_name)
    if adding:
        check_can_add(model, name, saves=bool(config.modules_to_save))
    elif is_wrapped(model):
        raise ValueError(
            "model is already wrapped; call asymlora.unwrap(model) first, or pass "
            "adapter_name to add another adapter"
        )
    targets = find_all_targets(model, config, adapted=adding)
    saved = modules_to_save(model, config, {t.name for t in targets})
    layers = build_layers(targets, config, threads=threads, adapter_name=name, model=model)
    named = [(target.name, layer) for target, layer in zip(targets, layers)]
    if should_check(check_ranks):
        check_layers(named, config)
    # Everything is checked; from here on the model changes.
    install_layers(model, named, config, name)
    for module in saved:
        module.requires_grad_(True)
    return model


def build_layers(
    targets: list[Target],
    config: LoraConfig,
    *,
    threads: int | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    model: nn.Module | None = None,
) -> list[LoraLayer]:
    """Adapter layers around each target's module, initialised per ``config``.

    Target ``i`` gets generator stream ``i`` (after the ``E`` streams of each 3-D
    parameter before it). An ``A`` that an adapter of ``model`` already holds for the
    module (same generator output) is reused, not generated.
    """
    streams, next_stream = [], 0
    for target in targets:
        streams.append(next_stream)
        next_stream += stream_width(target)
    specs = [adapter_spec(target, stream, config) for stream, target in zip(streams, targets)]
    known = known_a(model, specs) if model is not None else {}
    factors = initial_factors(specs, config, threads=threads, known=known)
    return [build_layer(spec, a, b, adapter_name) for spec, (a, b) in zip(specs, factors)]


def adapter_spec(target: Target, stream: int, config: LoraConfig) -> AdapterSpec:
    """How ``config`` adapts ``target``, which gets generator stream ``stream``."""
    rank = config.rank_for(target.name)
    identity = None
    if config.a_regenerable:
        identity = a_identity(
            generator="haar-v1",
            seed=config.seed,
            stream=stream,
            rank=rank,
            d_in=target.d_in,
            dtype="float32",
            gain=1.0,
            experts=expert_count(target),
        )
    return AdapterSpec(
        target,
        rank=rank,
        scale=config.scale_for(target.name),
        stream=stream,
        train_A=config.train in ("A", "AB"),
        train_B=config.train in ("B", "AB"),
        a_regenerated=config.a_regenerable,
        dropout=config.dropout,
        a_identity=identity,
    )


def unwrap(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Puts plain modules back; with ``merge`` the active adapter is merged into the weights
    first (other adapters are dropped).

    With ``merge=False`` every adapter is dropped (a merged one is unmerged), giving the
    base model back; ``modules_to_save`` keep their trained values either way.
    """
    _check_no_route(model, "unwrap")
    uninstall_layers(model, merge=merge)
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """``W += s * B @ A`` of the active adapter in every layer that holds it (float32,
    rounded once); returns ``model``.

    Forward then skips that adapter's branch until :func:`unmerge_adapter`. PEFT's
    ``merge_adapter``; :func:`unwrap` merges and puts plain modules back. With several
    adapters only the active one is merged; until :func:`unmerge_adapter`,
    :func:`asymlora.set_adapter` to another adapter, :func:`asymlora.per_sample_adapters`
    and :func:`asymlora.disable_adapters` raise ``ValueError``.
    """
    _check_no_route(model, "merge_adapter")
    if not lora_layers(model):
        return model
    active = active_adapter(model)
    merged = {layer.merged_adapter for _, layer in lora_layers(model)} - {None}
    if merged - {active}:
        raise ValueError(f"adapter {sorted(merged)[0]!r} is merged; unmerge_adapter first")
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undoes :func:`merge_adapter`: ``W -= s * B @ A`` (exact only as far as W's dtype allows)."""
    _check_no_route(model, "unmerge_adapter")
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def _check_no_route(model: nn.Module, what: str) -> None:
    if any(layer.route is not None for _, layer in lora_layers(model)):
        raise ValueError(
            f"{what} inside disable_adapters or per_sample_adapters; leave the context first"
        )


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
