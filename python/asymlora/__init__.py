"""asymlora: asymmetric low-rank adapters.

Freeze ``A`` as a seeded random-orthogonal matrix, train only ``B``. ``A`` is
regenerated bit for bit from (seed, stream) on any machine, so an adapter ships
only ``B`` and a seed. This package never imports torch at import time; the torch
layer is an optional extra (``pip install asymlora[torch]``).
"""

from typing import TYPE_CHECKING

from asymlora._native import FORMAT_VERSION, GENERATORS
from asymlora.adapter import Adapter, AdapterConfig, ModuleConfig, read_adapter, write_adapter
from asymlora.combine import CombineReport, combine_adapters
from asymlora.errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AsymloraError,
    CheckpointError,
    DistributedMismatchError,
    NonFiniteError,
    QuantizedBaseError,
    SafetensorsError,
)
from asymlora.lora_config import LoraConfig
from asymlora.offline_merge import MergeProgress, MergeReport, merge_files, unmerge_files
from asymlora.orthogonal import gaussian_matrix, random_orthogonal, random_orthogonal_many

if TYPE_CHECKING:  # static tools see the lazily loaded names below
    from asymlora.diagnostics import norm_report
    from asymlora.integrations.transformers import AsymloraCallback
    from asymlora.interop.peft import export_peft, import_peft
    from asymlora.nn import (
        LoraLayer,
        active_adapter,
        delete_adapter,
        disable_adapters,
        list_adapters,
        merge,
        merge_adapter,
        per_sample_adapters,
        prepare_model_for_kbit_training,
        print_trainable_parameters,
        quantize_bnb,
        set_adapter,
        trainable_parameters,
        unmerge,
        unmerge_adapter,
        unwrap,
        wrap,
    )
    from asymlora.nn.distributed import adapter_fingerprint, check_ranks
    from asymlora.nn.experts import ParametersWrapper, ParamLoraLayer
    from asymlora.nn.serialization import load_adapter, save_adapter

# The torch layer loads on first use, so `import asymlora` (and the CLI) never pays
# for importing torch: name -> module that defines it.
_TORCH_API = {
    "LoraLayer": "asymlora.nn",
    "wrap": "asymlora.nn",
    "unwrap": "asymlora.nn",
    "merge_adapter": "asymlora.nn",
    "unmerge_adapter": "asymlora.nn",
    "merge": "asymlora.nn",  # deprecated alias of merge_adapter
    "unmerge": "asymlora.nn",  # deprecated alias of unmerge_adapter
    "trainable_parameters": "asymlora.nn",
    "print_trainable_parameters": "asymlora.nn",
    "set_adapter": "asymlora.nn",
    "active_adapter": "asymlora.nn",
    "list_adapters": "asymlora.nn",
    "delete_adapter": "asymlora.nn",
    "disable_adapters": "asymlora.nn",
    "per_sample_adapters": "asymlora.nn",
    "save_adapter": "asymlora.nn.serialization",
    "load_adapter": "asymlora.nn.serialization",
    "export_peft": "asymlora.interop.peft",
    "import_peft": "asymlora.interop.peft",
    "norm_report": "asymlora.diagnostics",
    "check_ranks": "asymlora.nn.distributed",
    "adapter_fingerprint": "asymlora.nn.distributed",
    "AsymloraCallback": "asymlora.integrations.transformers",
    "prepare_model_for_kbit_training": "asymlora.nn",
    "quantize_bnb": "asymlora.nn",
    # target_parameters (MoE experts): see docs/experts.md
    "ParamLoraLayer": "asymlora.nn.experts",
    "ParametersWrapper": "asymlora.nn.experts",
}


def __getattr__(name: str) -> object:
    if name == "__version__":  # looked up on first use: importlib.metadata is slow to import
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("asymlora")
        except PackageNotFoundError:  # running from a source tree without an install
            value = "0.0.0+unknown"
        globals()["__version__"] = value
        return value
    module = _TORCH_API.get(name)
    if module is None:
        raise AttributeError(f"module 'asymlora' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_TORCH_API))


__all__ = [
    "FORMAT_VERSION",
    "GENERATORS",
    "Adapter",
    "AdapterConfig",
    "AdapterFormatError",
    "AdapterMismatchError",
    "AsymloraCallback",
    "AsymloraError",
    "CheckpointError",
    "CombineReport",
    "DistributedMismatchError",
    "LoraConfig",
    "LoraLayer",
    "MergeProgress",
    "MergeReport",
    "ModuleConfig",
    "NonFiniteError",
    "ParamLoraLayer",
    "ParametersWrapper",
    "QuantizedBaseError",
    "SafetensorsError",
    "__version__",
    "active_adapter",
    "adapter_fingerprint",
    "check_ranks",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "export_peft",
    "gaussian_matrix",
    "import_peft",
    "list_adapters",
    "load_adapter",
    "merge",
    "merge_adapter",
    "merge_files",
    "norm_report",
    "per_sample_adapters",
    "prepare_model_for_kbit_training",
    "print_trainable_parameters",
    "quantize_bnb",
    "random_orthogonal",
    "random_orthogonal_many",
    "read_adapter",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unmerge",
    "unmerge_adapter",
    "unmerge_files",
    "unwrap",
    "wrap",
    "write_adapter",
]
