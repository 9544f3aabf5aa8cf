"""``torch.distributed``: the same ``A`` on every rank, never broadcast; sharded ``B`` saved whole.

Every rank regenerates its frozen ``A`` from (seed, stream) instead of receiving it, so
a data-parallel job moves only ``B`` (and its gradients). By job:

- :mod:`~asymlora.nn.distributed.fingerprint`: checks that all ranks really hold the
  same frozen factors (:func:`check_ranks`, run by :func:`asymlora.wrap` under an
  initialised process group);
- :mod:`~asymlora.nn.distributed.ddp`: tells ``DistributedDataParallel`` to leave the
  frozen factors alone (no broadcast at construction, none before each forward);
- :mod:`~asymlora.nn.distributed.dtensor`: gathers FSDP2-sharded (``DTensor``) factors
  for :func:`asymlora.save_adapter` and scatters loaded ones for
  :func:`asymlora.load_adapter`;
- :mod:`~asymlora.nn.distributed.process`: rank 0 or not, and the model inside DDP and
  FSDP2's wrappers.
"""

from asymlora.nn.distributed.ddp import exclude_frozen_factors_from_ddp
from asymlora.nn.distributed.dtensor import copy_into, full_tensor
from asymlora.nn.distributed.fingerprint import adapter_fingerprint, check_ranks
from asymlora.nn.distributed.process import (
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
