"""Old home of the ``torch.distributed`` helpers, which live in ``asymlora.nn.distributed``.

Re-exports only (it defines nothing, and nothing in asymlora imports it), so code
written as ``from asymlora import distributed`` keeps working. ``asymlora.check_ranks`` and
``asymlora.adapter_fingerprint`` are the public names of the rank check.
"""

from asymlora.nn.distributed import (
    adapter_fingerprint,
    check_ranks,
    copy_into,
    exclude_frozen_factors_from_ddp,
    full_tensor,
    is_distributed,
    is_main_process,
    model_class,
    unwrap_parallel,
)

__all__ = [
    "adapter_fingerprint",
    "check_ranks",
    "copy_into",
    "exclude_frozen_factors_from_ddp",
    "full_tensor",
    "is_distributed",
    "is_main_process",
    "model_class",
    "unwrap_parallel",
]
