"""What a forward keeps for backward, measured (shared by the torch tests)."""

from __future__ import annotations

import torch


def saved_activation_bytes(module, x) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes of tensors autograd saves for backward in ``module(x)``, weights excluded."""
    shapes: list[tuple[int, ...]] = []
    weights = [t for t in [*module.parameters(), *module.buffers()]]
    seen: set[int] = {t.untyped_storage().data_ptr() for t in weights}
    seen.add(x.untyped_storage().data_ptr())  # the input exists anyway; count only new tensors
    total = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total[0] += t.untyped_storage().nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return total[0], shapes
