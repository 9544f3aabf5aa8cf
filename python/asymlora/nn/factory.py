"""Building adapted layers and putting them into a model: the one path every adapter takes.

:func:`asymlora.wrap` (factors initialised from a LoraConfig) and
:func:`asymlora.load_adapter` (factors read from a file) both describe each module
with an :class:`AdapterSpec`, build its :class:`LoraLayer` with :func:`build_layer` and
swap the layers in with :func:`install_layers`; so the dtype, device and trainability
rules of a factor live here only.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from asymlora.lora_config import LoraConfig
from asymlora.nn.base import BaseInfo
from asymlora.nn.distributed.ddp import exclude_frozen_factors_from_ddp
from asymlora.nn.experts import (
    ParamLoraLayer,
    ParamTarget,
    expert_count,
    factor_shapes,
    install_parameter_layer,
    remove_layer,
)
from asymlora.nn.layer import DEFAULT_ADAPTER, LoraLayer
from asymlora.nn.model import (
    active_adapter,
    adapter_configs,
    clear_config,
    is_wrapped,
    lora_layers,
    replace_module,
    set_config,
)
from asymlora.nn.targets import Target
from asymlora.nn.tensors import to_torch
from asymlora.orthogonal import random_orthogonal_many


@dataclass(frozen=True)
class AdapterSpec:
    """What defines one adapted module, apart from the values of its factors."""

    target: Target
    rank: int
    #: ``s`` in ``W + s * B @ A`` (from :meth:`LoraConfig.scale_for` or
    #: :meth:`AdapterConfig.scale`, which own the scaling rule)
    scale: float
    #: generator stream of this module's frozen factor
    stream: int
    train_A: bool
    train_B: bool
    #: True when ``A`` is the generator's output for (seed, stream): never stored
    a_regenerated: bool
    dropout: float = 0.0
    #: dtype ``A`` is kept in; ``None``: :func:`factor_dtype`'s rule
    dtype_A: torch.dtype | None = None
    #: dtype ``B`` is kept in; ``None``: :func:`factor_dtype`'s rule
    dtype_B: torch.dtype | None = None
    #: what defines a regenerated ``A`` (:func:`a_identity`); adapters of one layer with
    #: equal identities share one buffer. ``None``: ``A`` is not shared
    a_identity: Hashable | None = None

    @property
    def name(self) -> str:
        return self.target.name


def a_identity(
    *,
    generator: str,
    seed: int,
    stream: int,
    rank: int,
    d_in: int,
    dtype: str,
    gain: float,
    experts: int | None = None,
) -> tuple[object, ...]:
    """What makes two regenerated ``A`` the same tensor: the generator and its inputs
    (``experts``: the number of expert blocks of a 3-D parameter's ``A``)."""
    key = (generator, int(seed), int(stream), int(rank), int(d_in), dtype, float(gain))
    return key if experts is None else (*key, "experts", int(experts))


def build_layer(
    spec: AdapterSpec,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    adapter_name: str = DEFAULT_ADAPTER,
) -> LoraLayer:
    """The adapted layer around ``spec.target.module``, holding ``lora_A`` and ``lora_B``
    as adapter ``adapter_name``.

    The factors are copied to the base weight's device, in the dtype of the spec (by
    default: trained ones in :func:`master_dtype`, frozen ones in the base layer's dtype:
    a quantised layer's compute dtype, :class:`~asymlora.nn.base.BaseInfo`).

    Raises:
        ValueError: a factor's shape is not ``rank x d_in`` (A) or ``d_out x rank`` (B)
            (with a leading ``E`` for a 3-D parameter).
    """
    target = spec.target
    shape_a, shape_b = factor_shapes(target, spec.rank)
    _check_shape("lora_A", lora_A, shape_a, spec.name)
    _check_shape("lora_B", lora_B, shape_b, spec.name)
    base = target.base
    if isinstance(target, ParamTarget):
        return ParamLoraLayer(
            target.module,
            target.param_name,
            _placed(lora_A, base, spec.dtype_A, trained=spec.train_A),
            _placed(lora_B, base, spec.dtype_B, trained=spec.train_B),
            experts=target.experts,
            transposed=target.transposed,
            scale=spec.scale,
            stream=spec.stream,
            train_A=spec.train_A,
            train_B=spec.train_B,
            a_regenerated=spec.a_regenerated,
            adapter_name=adapter_name,
            a_identity=spec.a_identity,
        )
    return LoraLayer(
        target.module,
        _placed(lora_A, base, spec.dtype_A, trained=spec.train_A),
        _placed(lora_B, base, spec.dtype_B, trained=spec.train_B),
        scale=spec.scale,
        stream=spec.stream,
        train_A=spec.train_A,
        train_B=spec.train_B,
        a_regenerated=spec.a_regenerated,
        dropout=spec.dropout,
        fan_in_fan_out=target.fan_in_fan_out,
        adapter_name=adapter_name,
        a_identity=spec.a_identity,
        tied_with=target.tied_with,
    )


def install_layers(
    model: nn.Module,
    layers: Sequence[tuple[str, LoraLayer]],
    config: LoraConfig,
    adapter_name: str = DEFAULT_ADAPTER,
) -> None:
    """Puts adapter ``adapter_name`` (its ``(name, layer)``, built by :func:`build_layer`)
    into ``model`` and records ``config`` as its LoraConfig.

    Into a plain model: freezes it, swaps each layer in; the adapter is active. Into a
    wrapped model: a module already adapted takes the layer's adapter as one more
    branch (sharing an equal regenerated ``A``), another module is swapped for the
    layer; the active adapter stays, and the new adapter's factors do not require grad
    until it is made active. Also puts the frozen factors on DDP's ignore list: every
    rank builds them itself. The caller makes trainable again what should be
    (``modules_to_save``).
    """
    first = not is_wrapped(model)
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
    else:  # not the active adapter: nothing of it is trained for now
        for _, layer in layers:
            for _, factor in layer.adapter(adapter_name).factors():
                factor.requires_grad_(False)
    for name, layer in layers:
        if isinstance(layer, ParamLoraLayer):  # an adapted parameter: into its owner's wrapper
            install_parameter_layer(model, name, layer)
            continue
        current = model.get_submodule(name)
        if isinstance(current, LoraLayer):
            current.take_adapter(layer, adapter_name)
        else:
            replace_module(model, name, layer)
    set_config(model, config, adapter_name)
    active = active_adapter(model)
    for name, _ in layers:
        model.get_submodule(name).set_active(active)
    exclude_frozen_factors_from_ddp(model)


def existing_a(model: nn.Module, spec: AdapterSpec) -> torch.Tensor | None:
    """The ``A`` tensor an adapter of ``model`` already holds for ``spec``'s module with
    the same :attr:`AdapterSpec.a_identity`, else ``None`` (it is to be built)."""
    if spec.a_identity is None:
        return None
    try:
        layer = model.get_submodule(spec.name)
    except AttributeError:  # a parameter not adapted yet
        return None
    if not isinstance(layer, LoraLayer):
        return None
    for name in layer.adapter_names:
        view = layer.adapter(name)
        if view.a_identity == spec.a_identity:
            return view.lora_A
    return None


def known_a(model: nn.Module, specs: Sequence[AdapterSpec]) -> dict[str, torch.Tensor]:
    """:func:`existing_a` of every spec that has one: module name -> ``A``."""
    found = {s.name: existing_a(model, s) for s in specs}
    return {name: a for name, a in found.items() if a is not None}


def uninstall_layers(model: nn.Module, *, merge: bool) -> None:
    """Puts plain modules back (with ``merge``, each layer's active adapter merged into
    its weight first; else merged adapters are unmerged) and forgets every config."""
    for name, layer in lora_layers(model):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        remove_layer(model, name, layer)
    clear_config(model)
    exclude_frozen_factors_from_ddp(model)  # takes the adapter's names off DDP's list


def check_can_add(model: nn.Module, adapter_name: str, *, saves: bool) -> None:
    """Raises ``ValueError`` when adapter ``adapter_name`` cannot be added to the wrapped
    ``model``: the name is taken, or modules_to_save (``saves``: the new adapter has
    some) would have to be kept per adapter."""
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(
            f"model already has an adapter named {adapter_name!r} (its adapters: "
            f"{list(configs)}); pick another name or asymlora.delete_adapter it first"
        )
    if saves or any(c.modules_to_save for c in configs.values()):
        raise ValueError(
            f"cannot add adapter {adapter_name!r}: modules_to_save are trained in place, "
            "not per adapter, so a model with modules_to_save holds one adapter only"
        )


def initial_factors(
    specs: Sequence[AdapterSpec],
    config: LoraConfig,
    *,
    threads: int | None = None,
    known: Mapping[str, torch.Tensor] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(A, B)`` to start training from, per spec, as ``config`` says (float32).

    ``train="A"``: ``A`` is zero and ``B`` the generator's orthonormal columns;
    otherwise ``B`` is zero and ``A`` orthogonal from the generator (``threads`` in
    parallel) or Kaiming-uniform as PEFT's. An ``A`` in ``known`` (module name -> the
    same ``A``, already held by another adapter) is taken as it is, not generated.
    """
    if config.train == "A":
        b_init = _orthogonal_b(specs, config.seed, threads)
        return [(torch.zeros(factor_shapes(s.target, s.rank)[0]), b) for s, b in zip(specs, b_init)]
    if config.a_init == "kaiming":
        a_init = [_kaiming_a(s, config.seed) for s in specs]
    else:
        known = known or {}
        todo = [s for s in specs if s.name not in known]
        arrays = generated_factors(
            [(s.rank, s.target.d_in) for s in todo],
            [s.stream for s in todo],
            [expert_count(s.target) for s in todo],
            seed=config.seed,
            threads=threads,
        )
        made = {s.name: a for s, a in zip(todo, arrays)}
        a_init = [known[s.name] if s.name in known else made[s.name] for s in specs]
    return [(a, torch.zeros(factor_shapes(s.target, s.rank)[1])) for s, a in zip(specs, a_init)]


def generated_factors(
    shapes: Sequence[tuple[int, int]],
    streams: Sequence[int],
    experts: Sequence[int | None],
    *,
    seed: int,
    dtype: str = "float32",
    gain: float = 1.0,
    threads: int | None = None,
) -> list[torch.Tensor]:
    """The generator's ``rows x cols`` output per module at its stream (in parallel); a
    module of ``E`` experts gets ``(E, rows, cols)``, expert ``e`` from stream ``+ e``."""
    counts = [1 if e is None else e for e in experts]
    flat_shapes = [shape for shape, n in zip(shapes, counts) for _ in range(n)]
    flat_streams = [stream + e for stream, n in zip(streams, counts) for e in range(n)]
    arrays = random_orthogonal_many(
        flat_shapes, seed=seed, streams=flat_streams, dtype=dtype, gain=gain, threads=threads
    )
    made, start = [], 0
    for e, n in zip(experts, counts):
        blocks = [to_torch(a) for a in arrays[start : start + n]]
        made.append(blocks[0] if e is None else torch.stack(blocks))
        start += n
    return made


def factor_dtype(weight_dtype: torch.dtype, *, trained: bool) -> torch.dtype:
    """A factor's dtype next to a base weight of ``weight_dtype``.

    A frozen factor takes the weight's dtype (the branch computes in it anyway); a
    trained one the :func:`master_dtype`.
    """
    return master_dtype(weight_dtype) if trained else weight_dtype


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision weights, else ``dtype``.

    Trained factors of half-precision models stay float32, as PEFT's
    ``autocast_adapter_dtype``: an update of 1e-3 would often round away in bfloat16.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _placed(
    factor: torch.Tensor, base: BaseInfo, dtype: torch.dtype | None, *, trained: bool
) -> torch.Tensor:
    # On the base weight's device, in the spec's dtype or else factor_dtype's rule.
    if dtype is None:
        dtype = factor_dtype(base.dtype, trained=trained)
    return factor.to(device=base.device, dtype=dtype)


def _orthogonal_b(
    specs: Sequence[AdapterSpec], seed: int, threads: int | None
) -> list[torch.Tensor]:
    # A frozen B (train="A"): the transpose of the generator's r x d_out rows (per expert).
    rows = generated_factors(
        [(s.rank, s.target.d_out) for s in specs],
        [s.stream for s in specs],
        [expert_count(s.target) for s in specs],
        seed=seed,
        threads=threads,
    )
    return [r.mT.contiguous() for r in rows]


def _kaiming_a(spec: AdapterSpec, seed: int) -> torch.Tensor:
    # PEFT's init (kaiming_uniform_ with a=sqrt(5)); seeded per (seed, stream) so a run
    # repeats on one machine. Such an A is stored in the adapter file, never regenerated.
    # Expert e of a 3-D parameter is seeded with stream + e.
    experts = expert_count(spec.target)
    blocks = [_kaiming_block(spec, seed, spec.stream + e) for e in range(experts or 1)]
    return blocks[0] if experts is None else torch.stack(blocks)


def _kaiming_block(spec: AdapterSpec, seed: int, stream: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + stream) % 2**63)
    bound = 1.0 / math.sqrt(spec.target.d_in)
    a = torch.empty(spec.rank, spec.target.d_in, dtype=torch.float32)
    return a.uniform_(-bound, bound, generator=generator)


def _check_shape(factor: str, value: torch.Tensor, expected: tuple[int, ...], module: str) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(f"{module}: {factor} has shape {tuple(value.shape)}, expected {expected}")
