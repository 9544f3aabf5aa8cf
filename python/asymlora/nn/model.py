"""A wrapped model's adapter state: its adapters' LoraConfigs, the active adapter, its
adapted layers, its parameter counts.

A leaf of the torch layer: everything else in ``asymlora.nn`` reads and changes a
wrapped model through these helpers, and this module imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from asymlora.lora_config import LoraConfig
from asymlora.nn.layer import DEFAULT_ADAPTER, LoraLayer

#: attribute of a wrapped model that holds the LoraConfig of its active adapter
CONFIG_ATTR = "asymlora_config"
#: attribute of a wrapped model that holds adapter name -> LoraConfig, in the order added
ADAPTERS_ATTR = "asymlora_adapters"
#: attribute of a wrapped model that names its active adapter
ACTIVE_ATTR = "asymlora_active_adapter"


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """``(name, layer)`` of every adapted layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def layers_of(model: nn.Module, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    """``(name, layer)`` of the adapted layers that hold adapter ``adapter_name``."""
    return [(n, layer) for n, layer in lora_layers(model) if layer.has_adapter(adapter_name)]


def is_wrapped(model: nn.Module) -> bool:
    """True when ``model`` holds a LoraConfig or any adapted layer."""
    return hasattr(model, CONFIG_ATTR) or any(isinstance(m, LoraLayer) for m in model.modules())


def config_of(model: nn.Module, adapter_name: str | None = None) -> LoraConfig:
    """The LoraConfig of adapter ``adapter_name`` (default: the active adapter).

    Raises:
        ValueError: ``model`` is not wrapped, or holds no adapter ``adapter_name``.
    """
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError(
            "model is not wrapped by asymlora (call asymlora.wrap or asymlora.load_adapter)"
        )
    if adapter_name is None:
        return config
    return adapter_configs(model)[check_adapter(model, adapter_name)]


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """Adapter name -> LoraConfig of a wrapped model, in the order the adapters were added."""
    configs = getattr(model, ADAPTERS_ATTR, None)
    if configs is None:  # wrapped before models held several adapters
        config = getattr(model, CONFIG_ATTR, None)
        return {} if config is None else {DEFAULT_ADAPTER: config}
    return dict(configs)


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter a wrapped model's forward (and training) uses.

    Raises:
        ValueError: ``model`` is not wrapped.
    """
    config_of(model)
    return getattr(model, ACTIVE_ATTR, DEFAULT_ADAPTER)


def check_adapter(model: nn.Module, adapter_name: str) -> str:
    """``adapter_name`` when ``model`` holds an adapter of that name, else ``ValueError``."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(
            f"model has no adapter named {adapter_name!r}; its adapters: {list(configs)}"
        )
    return adapter_name


def set_config(model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Records ``config`` as the LoraConfig of adapter ``adapter_name`` (added if new;
    active when it is the first)."""
    configs = adapter_configs(model)
    configs[adapter_name] = config
    setattr(model, ADAPTERS_ATTR, configs)
    if not hasattr(model, CONFIG_ATTR) or active_adapter(model) == adapter_name:
        setattr(model, ACTIVE_ATTR, adapter_name)
        setattr(model, CONFIG_ATTR, config)


def set_active(model: nn.Module, adapter_name: str) -> None:
    """Records ``adapter_name`` (one of the model's adapters) as the active adapter."""
    config = adapter_configs(model)[adapter_name]
    setattr(model, ACTIVE_ATTR, adapter_name)
    setattr(model, CONFIG_ATTR, config)


def activate(model: nn.Module, adapter_name: str) -> None:
    """Makes ``adapter_name`` the active adapter of ``model`` and of each of its layers
    (layers without it add nothing); only its trained factors require grad."""
    set_active(model, adapter_name)
    for _, layer in lora_layers(model):
        layer.set_active(adapter_name)
        for name in layer.adapter_names:
            for _, factor in layer.adapter(name).factors():
                if isinstance(factor, nn.Parameter):
                    factor.requires_grad_(name == adapter_name)


def remove_config(model: nn.Module, adapter_name: str) -> None:
    """Forgets adapter ``adapter_name``; the first one left becomes active if it was."""
    configs = adapter_configs(model)
    del configs[adapter_name]
    if not configs:
        clear_config(model)
        return
    setattr(model, ADAPTERS_ATTR, configs)
    if active_adapter(model) == adapter_name:
        set_active(model, next(iter(configs)))


def clear_config(model: nn.Module) -> None:
    """Forgets every LoraConfig of ``model`` (no-op when there is none)."""
    for attr in (CONFIG_ATTR, ADAPTERS_ATTR, ACTIVE_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)


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
    frozen = sum(b.numel() for _, layer in lora_layers(model) for _, b in layer.frozen_factors())
    return TrainableSummary(trainable, total, frozen)


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints the line PEFT users know, plus the frozen factors kept as buffers."""
    print(trainable_parameters(model))
