"""Which modules can be adapted, which ones a LoraConfig selects, and their shapes.

A leaf of the torch layer (it imports the layer class and the config, nothing that uses
it): both :func:`asymlora.wrap` and :func:`asymlora.load_adapter` find their modules here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from asymlora._validate import list_problems
from asymlora.lora_config import ALL_LINEAR, LoraConfig
from asymlora.nn.base import (
    EMBEDDING,
    BaseInfo,
    describe,
    is_adaptable_linear,
    is_unsupported_quantized,
)
from asymlora.nn.layer import LoraLayer


@dataclass(frozen=True)
class Target:
    """A module that can be adapted, with its shape."""

    name: str
    #: the linear module itself (the base layer of a module that is already adapted)
    module: nn.Module
    d_in: int
    d_out: int
    #: True for transformers' Conv1D, whose weight is stored d_in x d_out
    fan_in_fan_out: bool
    #: the base layer's kind, factor dtype and device
    base: BaseInfo
    #: the output head that shares this embedding's weight (tied embeddings), else None
    tied_with: str | None = None


def find_targets(model: nn.Module, config: LoraConfig, *, adapted: bool = False) -> list[Target]:
    """The modules ``config`` selects, in ``named_modules`` order, checked.

    With ``adapted``, a module that is already a :class:`LoraLayer` can be selected (to
    add another adapter to it); the modules inside adapted layers never are.

    Raises:
        ValueError: nothing matches, or a selected module cannot be adapted (not a
            supported layer, or its rank exceeds a dimension); naming every problem.
    """
    selected = _select(model, config)
    if not selected:
        raise ValueError(_no_match_message(model, config))
    targets = []
    problems = []
    for name, module in selected:
        target = as_target(model, name, module, adapted=adapted)
        if isinstance(target, str):
            problems.append(f"{name}: {target}")
            continue
        rank, smallest = config.rank_for(name), min(target.d_in, target.d_out)
        if rank > smallest:
            problems.append(f"{name}: rank {rank} exceeds min(d_in, d_out) = {smallest}")
            continue
        targets.append(target)
    if problems:
        raise ValueError(
            f"cannot adapt {len(problems)} selected module(s):{list_problems(problems)}"
        )
    return targets


def as_target(
    model: nn.Module, name: str, module: nn.Module, *, adapted: bool = False
) -> Target | str:
    """``module`` (called ``name`` in ``model``) as a :class:`Target`, or why it cannot be one.

    With ``adapted``, a :class:`LoraLayer` is the target of its base layer.
    """
    if isinstance(module, LoraLayer):
        if not adapted:
            return "already adapted"
        module = module.base_layer
    base = describe(module)
    if isinstance(base, str):
        return base
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its out_proj weight directly; it cannot be wrapped"
    tied = _tied_head(model, module) if base.layer == EMBEDDING else None
    return Target(name, module, base.d_in, base.d_out, base.fan_in_fan_out, base, tied)


def modules_to_save(model: nn.Module, config: LoraConfig, targeted: set[str]) -> list[nn.Module]:
    """The modules of ``config.modules_to_save``, checked against the ``targeted`` names.

    Raises:
        ValueError: a name matches no module, or a saved module overlaps an adapted one.
    """
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


def _select(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    if config.target_modules == ALL_LINEAR:
        head = _output_head(model)
        return [
            (n, m)
            for n, m in _candidates(model)
            # a quantised layer asymlora cannot adapt is selected too, so it is refused
            # by name instead of silently left out
            if (is_adaptable_linear(m) or is_unsupported_quantized(m) or isinstance(m, LoraLayer))
            and m is not head
            and not config.saves(n)
            and not _inside_saved(n, config)
        ]
    return [(n, m) for n, m in _candidates(model) if n and config.targets(n)]


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # named_modules without what is inside adapted layers (their base layers, factors):
    # named_modules is depth first, so a layer's insides follow the layer itself.
    skip: str | None = None
    found = []
    for name, module in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        skip = None
        found.append((name, module))
        if isinstance(module, LoraLayer):
            skip = name + "." if name else ""
    return found


def _inside_saved(name: str, config: LoraConfig) -> bool:
    parts = name.split(".")
    return any(config.saves(".".join(parts[:i])) for i in range(1, len(parts)))


def _tied_head(model: nn.Module, embedding: nn.Module) -> str | None:
    # The name of another module whose weight is this embedding's weight tensor.
    weight = embedding.weight
    for name, module in model.named_modules():
        if module is not embedding and getattr(module, "weight", None) is weight:
            return name or type(model).__name__
    return None


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None


def _no_match_message(model: nn.Module, config: LoraConfig) -> str:
    suffixes = sorted(
        {n.rpartition(".")[2] for n, m in model.named_modules() if n and is_adaptable_linear(m)}
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


def _nested(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer + ".")
