"""Saving one adapter of a wrapped model (format v1) and loading one into a model."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from asymlora._validate import list_problems
from asymlora.adapter import (
    Adapter,
    AdapterConfig,
    ModuleConfig,
    PathLike,
    read_adapter,
    write_adapter,
)
from asymlora.errors import AdapterMismatchError
from asymlora.lora_config import LoraConfig
from asymlora.nn.distributed.dtensor import copy_into, full_tensor
from asymlora.nn.distributed.process import is_main_process, model_class, unwrap_parallel
from asymlora.nn.experts import (
    expert_count,
    file_fields,
    is_parameter_module,
    place_parameter,
)
from asymlora.nn.factory import (
    AdapterSpec,
    a_identity,
    build_layer,
    check_can_add,
    generated_factors,
    install_layers,
    known_a,
    master_dtype,
)
from asymlora.nn.layer import DEFAULT_ADAPTER, AdapterView, LoraLayer, check_adapter_name
from asymlora.nn.model import active_adapter, check_adapter, config_of, is_wrapped, layers_of
from asymlora.nn.targets import Target, as_target
from asymlora.nn.tensors import to_numpy, to_torch


def save_adapter(model: nn.Module, path: PathLike, adapter_name: str | None = None) -> None:
    """Writes one adapter of a wrapped model to ``path`` (format v1, atomic).

    ``adapter_name`` (default: the active adapter) names the adapter of a model that
    holds several. Stores ``B`` of every layer that holds it, ``A`` only where the
    generator cannot rebuild it (trained, Kaiming-initialised or imported), and the
    full weights of ``modules_to_save``. A frozen orthogonal ``A`` costs 8 bytes of
    seed in the file.

    Under ``torch.distributed`` only global rank 0 writes; the other ranks return
    without writing. FSDP2-sharded factors (``DTensor``) are gathered first, which is
    collective: then every rank must call it. A model inside
    ``DistributedDataParallel`` may be passed as is.

    Raises:
        ValueError: ``model`` is not wrapped, or holds no adapter ``adapter_name``.
    """
    model = unwrap_parallel(model)
    config_of(model)
    name = active_adapter(model) if adapter_name is None else check_adapter(model, adapter_name)
    config = config_of(model, name)
    layers = [(n, layer.adapter(name)) for n, layer in layers_of(model, name)]
    modules: dict[str, ModuleConfig] = {}
    tensors: dict[str, np.ndarray] = {}
    for module, view in layers:
        rank, alpha = config.rank_for(module), config.alpha_for(module)
        modules[module] = ModuleConfig(
            d_in=view.d_in,
            d_out=view.d_out,
            stream=view.stream,
            a_stored=not view.a_regenerated,
            rank=None if rank == config.r else rank,
            alpha=None if alpha == config.alpha else alpha,
            # a parameter's kind and experts, else the layer kind (and a conv's kernel)
            **(file_fields(view.layer) or {"kind": view.kind, "kernel": view.layer.kernel or None}),
        )
        tensors[f"{module}.lora_B"] = to_numpy(full_tensor(view.lora_B))
        if not view.a_regenerated:
            tensors[f"{module}.lora_A"] = to_numpy(full_tensor(view.lora_A))
    full = _saved_tensors(model, config)
    tensors.update({k: to_numpy(full_tensor(v)) for k, v in full.items()})
    if not is_main_process():
        return
    adapter_config = AdapterConfig(
        rank=config.r,
        alpha=config.alpha,
        seed=config.seed,
        modules=modules,
        scaling=config.scaling,
        a_dtype="float32",
        full_tensors=tuple(full),
        base_model=_describe(model, layers),
    )
    write_adapter(path, adapter_config, tensors)


def load_adapter(
    model: nn.Module,
    path: PathLike,
    adapter_name: str | None = None,
    *,
    is_trainable: bool = False,
    threads: int | None = None,
) -> nn.Module:
    """Loads the adapter at ``path`` into ``model`` and returns the model.

    A plain base model is wrapped with the adapter's modules, as adapter
    ``adapter_name`` (default ``"default"``), which is active. Into a wrapped model:

    - with ``adapter_name``: one more adapter of that name, not active (see
      :func:`asymlora.set_adapter`); it may have its own modules, ranks, seed or stored
      ``A``. A regenerated ``A`` equal to one an adapter of the model already holds (same
      seed, stream, rank, dtype, gain) is that buffer, not a copy: only ``B`` takes memory;
    - without: the file's factors replace those of the active adapter, which must have
      the same adapted modules, ranks and (for regenerated ``A``) seed and streams.

    Regenerated ``A`` are rebuilt bit for bit, so the outputs equal those of the model
    that was saved. With ``is_trainable`` the loaded factors are trainable (``B``, and
    ``A`` where stored); otherwise frozen.

    Raises:
        AdapterMismatchError: the adapter does not fit ``model``; the model is unchanged.
        AdapterFormatError: the file is not a valid v1 adapter.
        ValueError: ``adapter_name`` is taken or cannot name a module, modules_to_save
            would meet a second adapter, or the active adapter is merged (loading into it).
    """
    adding = adapter_name is not None and is_wrapped(model)
    name = DEFAULT_ADAPTER if adapter_name is None else check_adapter_name(adapter_name)
    adapter = read_adapter(path)
    if adding:
        check_can_add(model, name, saves=bool(adapter.config.full_tensors))
        _add_from_adapter(model, adapter, name, is_trainable=is_trainable, threads=threads)
    elif is_wrapped(model):
        _load_into_wrapped(model, adapter)
    else:
        _wrap_from_adapter(model, adapter, name, is_trainable=is_trainable, threads=threads)
    return model


def _wrap_from_adapter(
    model: nn.Module, adapter: Adapter, name: str, *, is_trainable: bool, threads: int | None
) -> None:
    targets = _place(model, adapter)
    full = _check_full_tensors(model, adapter)
    layers = _build_layers(model, adapter, targets, name, is_trainable, threads)
    # Everything is checked; from here on the model changes.
    install_layers(model, layers, _config_from(adapter, is_trainable), name)
    _copy_full_tensors(model, full, trainable=is_trainable)


def _add_from_adapter(
    model: nn.Module, adapter: Adapter, name: str, *, is_trainable: bool, threads: int | None
) -> None:
    targets = _place(model, adapter, adapted=True)
    layers = _build_layers(model, adapter, targets, name, is_trainable, threads)
    # Everything is checked; from here on the model changes.
    install_layers(model, layers, _config_from(adapter, is_trainable), name)


def _build_layers(
    model: nn.Module,
    adapter: Adapter,
    targets: list[Target],
    name: str,
    is_trainable: bool,
    threads: int | None,
) -> list[tuple[str, LoraLayer]]:
    specs = [_spec(target, adapter, is_trainable) for target in targets]
    a_factors = _a_factors(adapter, threads, known_a(model, specs))
    layers = []
    for spec in specs:
        b = to_torch(adapter.lora_B(spec.name))
        layers.append((spec.name, build_layer(spec, a_factors[spec.name], b, name)))
    return layers


def _spec(target: Target, adapter: Adapter, is_trainable: bool) -> AdapterSpec:
    cfg = adapter.config
    m = cfg.modules[target.name]
    rank = cfg.module_rank(target.name)
    identity = None
    if not m.a_stored:
        identity = a_identity(
            generator=cfg.generator,
            seed=cfg.seed,
            stream=m.stream,
            rank=rank,
            d_in=m.d_in,
            dtype=cfg.a_dtype,
            gain=cfg.a_gain,
            experts=expert_count(target),
        )
    return AdapterSpec(
        target,
        rank=rank,
        scale=cfg.scale(target.name),
        stream=m.stream,
        train_A=is_trainable and m.a_stored,
        train_B=is_trainable,
        a_regenerated=not m.a_stored,
        # A frozen B keeps the master dtype too: saving the loaded model again writes
        # the file's bits, not B rounded to a half-precision weight's dtype.
        dtype_B=master_dtype(target.base.dtype),
        a_identity=identity,
    )


def _load_into_wrapped(model: nn.Module, adapter: Adapter) -> None:
    cfg = adapter.config
    active = active_adapter(model)
    layers = {n: layer.adapter(active) for n, layer in layers_of(model, active)}
    if any(view.layer.merged_adapter is not None for view in layers.values()):
        raise ValueError(
            f"adapter {active!r} is merged; call asymlora.unmerge_adapter(model) before "
            "loading other factors into it"
        )
    _raise_if(_fit_problems(layers, cfg, config_of(model).seed), adapter)
    full = _check_full_tensors(model, adapter)
    for name, view in layers.items():  # FSDP2-sharded factors take their part
        copy_into(view.lora_B, to_torch(adapter.lora_B(name)))
        if cfg.modules[name].a_stored:
            copy_into(view.lora_A, to_torch(adapter.lora_A(name)))
    _copy_full_tensors(model, full, trainable=None)


def _fit_problems(layers: Mapping[str, AdapterView], cfg: AdapterConfig, seed: int) -> list[str]:
    # Why the adapter's factors cannot replace those of a model wrapped with ``seed``.
    problems = []
    if set(layers) != set(cfg.modules):
        missing = sorted(set(cfg.modules) - set(layers))
        extra = sorted(set(layers) - set(cfg.modules))
        problems.append(
            f"adapted modules differ: only in the adapter {missing[:5]}, "
            f"only in the model {extra[:5]}"
        )
    for name in sorted(set(layers) & set(cfg.modules)):
        problem = _module_fit_problem(name, layers[name], cfg, seed)
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


def _module_fit_problem(name: str, layer: AdapterView, cfg: AdapterConfig, seed: int) -> str | None:
    m = cfg.modules[name]
    experts = getattr(layer, "experts", None)  # only a parameter's view has experts
    if experts != getattr(m, "experts", None):
        return f"model has {experts or 'no'} experts, the adapter another count"
    if (layer.rank, layer.d_in, layer.d_out) != (cfg.module_rank(name), m.d_in, m.d_out):
        return (
            f"model has rank {layer.rank}, {layer.d_out}x{layer.d_in}; "
            f"adapter has rank {cfg.module_rank(name)}, {m.d_out}x{m.d_in}"
        )
    if layer.scale != cfg.scale(name):
        return f"model scale {layer.scale:g} != adapter scale {cfg.scale(name):g}"
    if m.a_stored and layer.a_regenerated:
        return "the adapter stores a trained A but the model regenerates A; load into a fresh model"
    if not m.a_stored and not layer.a_regenerated:
        return "the adapter regenerates A but the model's A is trained; load into a fresh model"
    if not m.a_stored and (seed, layer.stream) != (cfg.seed, m.stream):
        return (
            f"A differs: model (seed {seed}, stream {layer.stream}), "
            f"adapter (seed {cfg.seed}, stream {m.stream})"
        )
    return None


def _place(model: nn.Module, adapter: Adapter, *, adapted: bool = False) -> list[Target]:
    cfg = adapter.config
    problems = []
    targets = []
    for name, m in cfg.modules.items():
        if is_parameter_module(m):
            target = place_parameter(model, name, m, adapted=adapted)
            if isinstance(target, str):
                problems.append(f"{name}: {target}")
            else:
                targets.append(target)
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module in {type(model).__name__}")
            continue
        target = as_target(model, name, module, adapted=adapted)
        if isinstance(target, str):
            problems.append(f"{name}: {target}")
        elif (target.base.layer, target.base.kernel) != (m.kind, m.kernel or ()):
            problems.append(f"{name}: model has {_kind_text(target)}, adapter {_kind_text(m)}")
        elif (target.d_in, target.d_out) != (m.d_in, m.d_out):
            problems.append(
                f"{name}: model is {target.d_out}x{target.d_in} (d_out x d_in), "
                f"adapter {m.d_out}x{m.d_in}"
            )
        else:
            targets.append(target)
    _raise_if(problems, adapter)
    return targets


def _kind_text(module: Target | ModuleConfig) -> str:
    # "a linear", "a conv with kernel (3, 3)" for a mismatch message
    if isinstance(module, Target):
        kind, kernel = module.base.layer, module.base.kernel
    else:
        kind, kernel = module.kind, module.kernel or ()
    return f"a {kind}" + (f" with kernel {tuple(kernel)}" if kernel else "")


def _a_factors(
    adapter: Adapter, threads: int | None, known: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    # A per module: stored, already held by the model (``known``), or regenerated.
    cfg = adapter.config
    regenerated = [n for n, m in cfg.modules.items() if not m.a_stored and n not in known]
    arrays = generated_factors(
        [(cfg.module_rank(n), cfg.modules[n].d_in) for n in regenerated],
        [cfg.modules[n].stream for n in regenerated],
        [getattr(cfg.modules[n], "experts", None) for n in regenerated],
        seed=cfg.seed,
        dtype=cfg.a_dtype,
        gain=cfg.a_gain,
        threads=threads,
    )
    factors = dict(zip(regenerated, arrays))
    factors.update(known)
    for name, m in cfg.modules.items():
        if m.a_stored:
            factors[name] = to_torch(adapter.lora_A(name))
    return factors


def _check_full_tensors(model: nn.Module, adapter: Adapter) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    problems = []
    full = {}
    for name in adapter.config.full_tensors:
        value = to_torch(adapter.tensors[name])
        target = state.get(name)
        if target is None:
            problems.append(
                f"full tensor {name}: no such parameter or buffer in {type(model).__name__}"
            )
        elif tuple(target.shape) != tuple(value.shape):
            problems.append(
                f"full tensor {name}: model shape {tuple(target.shape)}, "
                f"adapter {tuple(value.shape)}"
            )
        else:
            full[name] = value
    _raise_if(problems, adapter)
    return full


def _copy_full_tensors(
    model: nn.Module, full: Mapping[str, torch.Tensor], *, trainable: bool | None
) -> None:
    if not full:
        return
    owned = dict(model.named_parameters())
    owned.update(dict(model.named_buffers()))
    for name, value in full.items():
        target = owned[name]
        copy_into(target, value.to(target.dtype))  # FSDP2-sharded tensors take their part
        if trainable is not None and isinstance(target, nn.Parameter):
            target.requires_grad_(trainable)


def _saved_tensors(model: nn.Module, config: LoraConfig) -> dict[str, torch.Tensor]:
    full: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name and config.saves(name):
            for key, value in module.state_dict().items():
                if value.is_floating_point():
                    full[f"{name}.{key}"] = value
    return full


def _config_from(adapter: Adapter, is_trainable: bool) -> LoraConfig:
    cfg = adapter.config
    names = list(cfg.modules)
    params = tuple(n for n in names if is_parameter_module(cfg.modules[n]))
    any_stored = any(m.a_stored for m in cfg.modules.values())
    exact = {re.escape(n): n for n in names}
    return LoraConfig(
        r=cfg.rank,
        alpha=cfg.alpha,
        target_modules=tuple(n for n in names if n not in params),
        target_parameters=params,
        train=("AB" if any_stored else "B") if is_trainable else "B",
        seed=cfg.seed,
        rslora=cfg.rslora,
        modules_to_save=tuple(sorted({t.rpartition(".")[0] for t in cfg.full_tensors})),
        rank_pattern={
            k: cfg.module_rank(n) for k, n in exact.items() if cfg.modules[n].rank is not None
        },
        alpha_pattern={
            k: cfg.modules[n].alpha for k, n in exact.items() if cfg.modules[n].alpha is not None
        },
    )


def _describe(model: nn.Module, layers: list[tuple[str, AdapterView]]) -> dict[str, object]:
    # Informational (format v1 does not interpret base_model); PEFT export reads
    # fan_in_fan_out to mark GPT-2 style Conv1D weights.
    description: dict[str, object] = {"class": model_class(model).__name__}
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", "")
    if name_or_path:
        description["name_or_path"] = str(name_or_path)
    description["fan_in_fan_out"] = any(layer.fan_in_fan_out for _, layer in layers)
    return description


def _raise_if(problems: list[str], adapter: Adapter) -> None:
    if problems:
        raise AdapterMismatchError(
            f"adapter {adapter.path} does not fit this model ({len(problems)} problem(s)); "
            f"nothing was changed:{list_problems(problems)}"
        )
