"""Wrapping a model in place: find the targets, build the adapters, swap the modules."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
from torch import nn

from asymlora._validate import list_problems
from asymlora.lora_config import ALL_LINEAR, LoraConfig
from asymlora.nn.layer import LoraLayer
from asymlora.nn.tensors import to_torch
from asymlora.orthogonal import random_orthogonal, random_orthogonal_many

#: attribute of a wrapped model that holds its LoraConfig
CONFIG_ATTR = "asymlora_config"


@dataclass(frozen=True)
class Target:
    """One module to adapt, with its shape and settings resolved."""

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    rank: int
    scale: float
    stream: int
    fan_in_fan_out: bool


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
    factors, a collective that every rank must reach (see
    :func:`asymlora.distributed.check_ranks`).

    Raises:
        ValueError: nothing matches, a match is not a supported layer, a rank exceeds
            a dimension, or the model is already wrapped. The model is left unchanged.
        DistributedMismatchError: ranks disagree (e.g. a different seed per rank); on
            every rank, the model left unchanged.
    """
    from asymlora import distributed  # imports this module: not at the top

    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be an asymlora.LoraConfig, got {type(config).__name__}")
    if is_wrapped(model):
        raise ValueError("model is already wrapped; call asymlora.unwrap(model) first")
    targets = find_targets(model, config)
    saved = _modules_to_save(model, config, {t.name for t in targets})
    layers = build_layers(targets, config, threads=threads)
    if distributed.should_check(check_ranks):
        distributed.check_layers([(t.name, layer) for t, layer in zip(targets, layers)], config)
    for p in model.parameters():
        p.requires_grad_(False)
    for target, layer in zip(targets, layers):
        replace_module(model, target.name, layer)
    for module in saved:
        for p in module.parameters():
            p.requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    distributed.exclude_frozen_factors_from_ddp(model)
    return model


def find_targets(model: nn.Module, config: LoraConfig) -> list[Target]:
    """The modules ``config`` selects, checked; raises ``ValueError`` naming the problem."""
    selected = _select(model, config)
    if not selected:
        raise ValueError(_no_match_message(model, config))
    targets = []
    problems = []
    for stream, (name, module) in enumerate(selected):
        shape = linear_shape(model, name, module)
        if isinstance(shape, str):
            problems.append(f"{name}: {shape}")
            continue
        d_in, d_out, fan_in_fan_out = shape
        rank = config.rank_for(name)
        if rank > min(d_in, d_out):
            problems.append(f"{name}: rank {rank} exceeds min(d_in, d_out) = {min(d_in, d_out)}")
            continue
        targets.append(
            Target(name, module, d_in, d_out, rank, config.scale_for(name), stream, fan_in_fan_out)
        )
    if problems:
        raise ValueError(
            f"cannot adapt {len(problems)} selected module(s):{list_problems(problems)}"
        )
    return targets


def build_layers(
    targets: list[Target], config: LoraConfig, *, threads: int | None = None
) -> list[LoraLayer]:
    """Adapter layers around each target's module, factors initialised per ``config``."""
    a_init = _initial_a(targets, config, threads)
    layers = []
    for target, a in zip(targets, a_init):
        weight = target.module.weight
        trained_dtype = master_dtype(weight.dtype)
        if config.train == "A":
            a = torch.zeros(target.rank, target.d_in, dtype=trained_dtype)
            b_bits = random_orthogonal(
                target.rank, target.d_out, seed=config.seed, stream=target.stream
            )
            b = to_torch(b_bits.T).to(weight.dtype)
        else:
            a = a.to(trained_dtype if config.train == "AB" else weight.dtype)
            b = torch.zeros(target.d_out, target.rank, dtype=trained_dtype)
        layers.append(
            LoraLayer(
                target.module,
                a.to(weight.device),
                b.to(weight.device),
                scale=target.scale,
                stream=target.stream,
                train_A=config.train in ("A", "AB"),
                train_B=config.train in ("B", "AB"),
                a_regenerated=config.a_regenerable,
                dropout=config.dropout,
                fan_in_fan_out=target.fan_in_fan_out,
            )
        )
    return layers


def unwrap(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Puts plain modules back; with ``merge`` the adapters are merged into the weights first.

    With ``merge=False`` the adapters are dropped (merged ones are unmerged), giving the
    base model back; ``modules_to_save`` keep their trained values either way.
    """
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        replace_module(model, name, layer.base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    from asymlora.distributed import exclude_frozen_factors_from_ddp

    exclude_frozen_factors_from_ddp(model)  # takes the adapter's names off DDP's list
    return model


def merge(model: nn.Module) -> nn.Module:
    """``W += s * B @ A`` in every adapted layer (float32, rounded once).

    Forward then skips the adapter branch until :func:`unmerge`.
    """
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undoes :func:`merge`: ``W -= s * B @ A`` (exact only as far as W's dtype allows)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """``(name, layer)`` of every adapted layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def is_wrapped(model: nn.Module) -> bool:
    return hasattr(model, CONFIG_ATTR) or any(isinstance(m, LoraLayer) for m in model.modules())


def config_of(model: nn.Module) -> LoraConfig:
    """The LoraConfig a wrapped model was wrapped with."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError(
            "model is not wrapped by asymlora (call asymlora.wrap or asymlora.load_adapter)"
        )
    return config


@dataclass(frozen=True)
class TrainableSummary:
    """Parameter counts of a wrapped model (frozen adapter factors are buffers, counted apart)."""

    trainable: int
    total: int
    frozen_factors: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / self.total if self.total else 0.0
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {pct:.4f} || frozen adapter factors (buffers): {self.frozen_factors:,}"
        )


def trainable_parameters(model: nn.Module) -> TrainableSummary:
    """Counts like PEFT's ``get_nb_trainable_parameters``."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(
        b.numel() for _, layer in lora_layers(model) for n, b in layer.named_buffers(recurse=False)
    )
    return TrainableSummary(trainable, total, frozen)


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints the line PEFT users know, plus the frozen factors kept as buffers."""
    print(trainable_parameters(model))


def _select(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    if config.target_modules == ALL_LINEAR:
        head = _output_head(model)
        return [
            (n, m)
            for n, m in model.named_modules()
            if _is_linear(m)
            and m is not head
            and not config.saves(n)
            and not _inside_saved(n, config)
        ]
    return [(n, m) for n, m in model.named_modules() if n and config.targets(n)]


def _inside_saved(name: str, config: LoraConfig) -> bool:
    parts = name.split(".")
    return any(config.saves(".".join(parts[:i])) for i in range(1, len(parts)))


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _is_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_shape(model: nn.Module, name: str, module: nn.Module) -> tuple[int, int, bool] | str:
    """(d_in, d_out, fan_in_fan_out), or why the module cannot be adapted."""
    if isinstance(module, LoraLayer):
        return "already adapted"
    if not _is_linear(module):
        kind = type(module).__name__
        return f"{kind} is not supported (only torch.nn.Linear and transformers Conv1D)"
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its out_proj weight directly; it cannot be wrapped"
    weight = module.weight
    if not weight.is_floating_point():
        return (
            f"weight dtype {weight.dtype} is not a float dtype (quantized layers are not supported)"
        )
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    d_in, d_out = weight.shape  # Conv1D stores its weight transposed: d_in x d_out
    return d_in, d_out, True


def _no_match_message(model: nn.Module, config: LoraConfig) -> str:
    suffixes = sorted(
        {n.rpartition(".")[2] for n, m in model.named_modules() if n and _is_linear(m)}
    )
    wanted = (
        [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
    )
    hints = []
    for target in wanted:
        close = difflib.get_close_matches(target.rpartition(".")[2], suffixes, n=3, cutoff=0.5)
        if close:
            hints.append(f"{target!r} -> did you mean {', '.join(map(repr, close))}?")
    listing = ", ".join(suffixes[:30]) + (" ..." if len(suffixes) > 30 else "")
    text = (
        f"no module matches target_modules={config.target_modules!r}; "
        f"linear layers here end with: {listing}"
    )
    return text + ("\n  " + "\n  ".join(hints) if hints else "")


def _modules_to_save(model: nn.Module, config: LoraConfig, targeted: set[str]) -> list[nn.Module]:
    found = [(n, m) for n, m in model.named_modules() if n and config.saves(n)]
    missing = [
        t
        for t in config.modules_to_save
        if not any(n == t or n.endswith("." + t) for n, _ in found)
    ]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of {type(model).__name__}")
    # A saved module is stored in full; it cannot also hold (or sit inside) an adapter.
    clash = sorted(
        f"{n} / {t}" for n, _ in found for t in targeted if _nested(n, t) or _nested(t, n)
    )
    if clash:
        raise ValueError(
            f"modules_to_save overlap adapted modules ({', '.join(clash[:5])}); "
            "a module is either adapted or saved in full"
        )
    return [m for _, m in found]


def _nested(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer + ".")


def _initial_a(
    targets: list[Target], config: LoraConfig, threads: int | None
) -> list[torch.Tensor]:
    if config.train == "A":
        return [torch.empty(0)] * len(targets)
    if config.a_init == "kaiming":
        return [_kaiming_a(t, config.seed) for t in targets]
    arrays = random_orthogonal_many(
        [(t.rank, t.d_in) for t in targets],
        seed=config.seed,
        streams=[t.stream for t in targets],
        threads=threads,
    )
    return [to_torch(a) for a in arrays]


def _kaiming_a(target: Target, seed: int) -> torch.Tensor:
    # PEFT's init (kaiming_uniform_ with a=sqrt(5)); seeded per (seed, stream) so a run
    # repeats on one machine. Such an A is stored in the adapter file, never regenerated.
    generator = torch.Generator().manual_seed((seed * 1_000_003 + target.stream) % 2**63)
    bound = 1.0 / math.sqrt(target.d_in)
    a = torch.empty(target.rank, target.d_in, dtype=torch.float32)
    return a.uniform_(-bound, bound, generator=generator)


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    # Trained factors of half-precision models stay float32, as PEFT's autocast_adapter_dtype.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
