"""Old home of the ``torch.distributed`` helpers, which live in ``asymlora.nn.distributed``.

Re-exports only (it defines nothing, and nothing in asymlora imports it), so code
written as ``from asymlora import distributed`` keeps working. ``asymlora.check_ranks`` and
``asymlora.adapter_fingerprint`` are the public names of the rank check.
"""

from asymlora.nn import distributed as _home
from asymlora.nn.distributed import *  # noqa: F403  (the same names: one list, in nn.distributed)

__all__ = list(_home.__all__)
