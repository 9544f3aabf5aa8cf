"""A wrapped model's adapter state: its LoraConfig, its adapted layers, its parameter counts.

A leaf of the torch layer: everything else in ``asymlora.nn`` reads and changes a
wrapped model through these helpers, and this module imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from asymlora.lora_config import LoraConfig
from asymlora.nn.layer import LoraLayer

#: attribute of a wrapped model that holds its LoraConfig
CONFIG_ATTR = "asymlora_config"


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """``(name, layer)`` of every adapted layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def is_wrapped(model: nn.Module) -> bool:
    """True when ``model`` holds a LoraConfig or any adapted layer."""
    return hasattr(model, CONFIG_ATTR) or any(isinstance(m, LoraLayer) for m in model.modules())


def config_of(model: nn.Module) -> LoraConfig:
    """The LoraConfig a wrapped model was wrapped with.

    Raises:
        ValueError: ``model`` is not wrapped.
    """
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError(
            "model is not wrapped by asymlora (call asymlora.wrap or asymlora.load_adapter)"
        )
    return config


def set_config(model: nn.Module, config: LoraConfig) -> None:
    """Records ``config`` as the one ``model`` is wrapped with."""
    setattr(model, CONFIG_ATTR, config)


def clear_config(model: nn.Module) -> None:
    """Forgets the LoraConfig of ``model`` (no-op when there is none)."""
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` where the submodule called ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
    frozen = sum(b.numel() for _, layer in lora_layers(model) for b in layer.buffers(recurse=False))
    return TrainableSummary(trainable, total, frozen)


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints the line PEFT users know, plus the frozen factors kept as buffers."""
    print(trainable_parameters(model))
