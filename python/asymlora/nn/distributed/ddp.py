"""``DistributedDataParallel``: frozen adapter factors stay off its broadcasts.

DDP broadcasts all parameters and buffers from rank 0 when it is built, and all
buffers again before every forward. A frozen factor is a buffer that every rank
regenerates itself, so sending it is wasted traffic: asymlora lists it in the module
attribute DDP reads, as DDP's own ``_set_params_and_buffers_to_ignore_for_model`` does.
"""

from __future__ import annotations

from torch import nn

from asymlora.nn.model import lora_layers

#: model attribute listing the frozen-factor names asymlora added to DDP's ignore list
DDP_IGNORED_BY_ASYMLORA = "_asymlora_ddp_ignored"
#: the attribute ``DistributedDataParallel`` reads on the module it wraps
DDP_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"


def exclude_frozen_factors_from_ddp(model: nn.Module) -> list[str]:
    """Puts every frozen adapter factor of ``model`` on DDP's ignore list; returns the names.

    Names the user put on the list are kept; names asymlora put there before and that
    are no longer frozen factors are taken off. Called by :func:`asymlora.wrap`,
    :func:`asymlora.load_adapter` and :func:`asymlora.unwrap` (which takes the names off
    again); it affects DDP built on ``model`` itself, not on a module that contains it.
    """
    ours = frozen_factor_names(model)
    before = set(getattr(model, DDP_IGNORED_BY_ASYMLORA, ()))
    kept = [n for n in getattr(model, DDP_IGNORE_ATTR, ()) if n not in before]
    names = kept + [n for n in ours if n not in kept]
    if names:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, names
        )
    else:
        _clear(model, DDP_IGNORE_ATTR)
    if ours:
        setattr(model, DDP_IGNORED_BY_ASYMLORA, tuple(ours))
    else:
        _clear(model, DDP_IGNORED_BY_ASYMLORA)
    return ours


def frozen_factor_names(model: nn.Module) -> list[str]:
    """State names (``{module}.lora_A`` ...) of every frozen factor, in module order."""
    return [
        f"{name}.{factor}"
        for name, layer in lora_layers(model)
        for factor, _ in layer.frozen_factors()
    ]


def _clear(model: nn.Module, attr: str) -> None:
    if hasattr(model, attr):
        delattr(model, attr)
