"""Hugging Face PEFT interop: export an adapter as a PEFT LoRA directory, import one back.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors``.
Each adapted module ``{m}`` (a name from the base model's ``named_modules()``) has the
tensors ``base_model.model.{m}.lora_A.weight`` (r x d_in) and
``base_model.model.{m}.lora_B.weight`` (d_out x r); the update is ``s * B @ A`` with
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), exactly as in an
asymlora adapter. PEFT stores the tensors of ``modules_to_save`` under
``base_model.model.`` plus their state-dict name in the base model (for example
``base_model.model.classifier.weight``), without the adapter name.

Neither function needs torch. Import goes through the core's PEFT reader (the one the
offline merge and the CLI use); export writes the safetensors file through the core's
writer from numpy arrays (``ml_dtypes.bfloat16`` for bf16), so every dtype, bf16
included, round-trips bit for bit. (Export looks the base-model class up in
transformers, if installed, for PEFT's ``auto_mapping``.) A pickled
``adapter_model.bin`` is never opened.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from asymlora import _native
from asymlora._safetensors import write_safetensors
from asymlora._validate import check_uint
from asymlora.adapter import AdapterConfig, PathLike, read_adapter
from asymlora.lora_config import pattern_value

__all__ = ["export_peft", "import_peft"]

#: file names of a PEFT adapter directory, and the prefix ``PeftModel.save_pretrained``
#: gives every tensor key (the core's PEFT module owns them)
CONFIG_NAME: str = _native.PEFT_CONFIG_NAME
WEIGHTS_NAME: str = _native.PEFT_WEIGHTS_NAME
PICKLE_WEIGHTS_NAME: str = _native.PEFT_PICKLE_WEIGHTS_NAME
KEY_PREFIX: str = _native.PEFT_KEY_PREFIX

# What ``PeftModel.save_pretrained`` may leave in an adapter directory: the only
# entries an ``overwrite=True`` export replaces.
_PEFT_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, "README.md"})


# --------------------------------------------------------------------------- export


def export_peft(
    adapter_path: PathLike,
    out_dir: PathLike,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    model: Any = None,
) -> Path:
    """Writes the asymlora adapter at ``adapter_path`` as a PEFT LoRA directory ``out_dir``.

    The directory holds ``adapter_config.json`` (``peft_type`` ``"LORA"``, ``r``,
    ``lora_alpha``, the exact adapted module names as ``target_modules``, per-module
    ranks and alphas as ``rank_pattern``/``alpha_pattern``, ``use_rslora`` for
    ``alpha/sqrt(r)`` scaling, ``fan_in_fan_out`` from the adapter's base-model
    description, ``modules_to_save``) and ``adapter_model.safetensors`` with every ``A``
    materialised from the seed. It loads with
    ``peft.PeftModel.from_pretrained(base_model, out_dir)`` and computes what the
    asymlora-wrapped model computes. Factor dtypes are kept (a bf16 ``B`` stays bf16).

    Every kind is written in PEFT's own layout: embeddings as ``lora_embedding_A`` /
    ``lora_embedding_B``, convolutions as ``lora_A.weight`` ``(r, c_in, *kernel)`` and
    ``lora_B.weight`` ``(c_out, r, 1, ...)``, both listed in ``target_modules``; parameters
    (``kind="parameter"``) in ``target_parameters`` by full name, as PEFT's
    ``ParamWrapper`` stores them (``lora_A.weight`` ``(E * r, d_in)``, ``lora_B.weight``
    ``(d_out, r * E)`` interleaved). Several parameters of one module nest wrappers in
    the module's parameter order, the last outermost (keys ``{module}.lora_A.weight``,
    ``{module}.base_layer.lora_A.weight``, ...): that order is read from ``model`` when
    given, else taken to be transformers' experts order (``gate_up_proj``, ``gate_proj``,
    ``up_proj`` before ``down_proj``, others by name), the order ``import_peft`` and the
    merge read nested wrappers in.

    The directory is built next to ``out_dir`` and renamed into place at the end, so a
    failure leaves nothing under ``out_dir``.

    Args:
        adapter_path: an asymlora adapter file (format v1).
        out_dir: the PEFT directory to create; its parent must exist.
        base_model_name_or_path: written as PEFT's ``base_model_name_or_path``; by
            default the adapter's ``base_model["name_or_path"]``, else ``null``.
        overwrite: replace an existing ``out_dir``. Only a directory holding nothing
            but PEFT adapter files (``adapter_config.json``, ``adapter_model.*``,
            ``README.md``) is replaced; anything else there is refused.
        model: the base model (a ``torch.nn.Module``), only to read the order of the
            adapted parameters of a module that has several (see above).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false, or it is not a
            PEFT adapter directory.
        FileNotFoundError: ``adapter_path`` or the parent of ``out_dir`` does not exist.
        AdapterFormatError: ``adapter_path`` is not a valid adapter.
        ValueError: the adapter has something PEFT cannot express (a full tensor that
            belongs to no submodule, or one inside an adapted module).
    """
    out = Path(out_dir)
    _check_destination(out, overwrite)
    adapter = read_adapter(adapter_path)
    cfg = adapter.config
    base = cfg.base_model or {}
    modules = sorted(cfg.modules, key=_natural_key)
    saved = _modules_to_save(cfg.full_tensors, modules, adapter.path)

    layers = [n for n in modules if cfg.modules[n].kind != "parameter"]
    parameters = _parameter_order([n for n in modules if n not in layers], model)
    tensors: dict[str, np.ndarray] = {}
    for name in layers:
        tensors.update(_layer_tensors(adapter, name))
    for name, depth in parameters.items():
        tensors.update(_parameter_tensors(adapter, name, depth))
    for name in cfg.full_tensors:
        tensors[KEY_PREFIX + name] = adapter.tensors[name]

    if base_model_name_or_path is None:
        stored = base.get("name_or_path")
        base_model_name_or_path = stored if isinstance(stored, str) else None
    rank_pattern, alpha_pattern = _patterns(cfg, modules)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "auto_mapping": _auto_mapping(base.get("class")),
        "inference_mode": True,
        "r": cfg.rank,
        "lora_alpha": _number(cfg.alpha),
        "target_modules": layers or None,
        "target_parameters": list(parameters) or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": cfg.rslora,
        "fan_in_fan_out": bool(base.get("fan_in_fan_out", False)),
        "modules_to_save": saved or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }

    def write(directory: Path) -> None:
        text = json.dumps(peft_config, indent=2, sort_keys=True, allow_nan=False) + "\n"
        _write_file(directory / CONFIG_NAME, text.encode())
        write_safetensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt"})

    _publish(out, overwrite, write)
    return out


def _check_destination(out: Path, overwrite: bool) -> None:
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot create {out}: the directory {out.parent} does not exist")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} already exists; pass overwrite=True to replace it, or choose another directory"
        )
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; refusing to replace it")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _PEFT_FILES or p.is_dir())
    if foreign:
        raise FileExistsError(
            f"{out} holds entries that are not PEFT adapter files ({', '.join(foreign[:5])}); "
            "refusing to replace it even with overwrite=True"
        )


def _publish(out: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Runs ``write`` into a fresh directory next to ``out``, then renames it to ``out``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an adapter directory is not
        _check_destination(out, overwrite)  # again: it may have appeared meanwhile
        if out.exists():
            old = out.with_name(f".{out.name}.{secrets.token_hex(4)}.old")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, out)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FileExistsError(f"{out} appeared while exporting; not replaced") from exc
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _layer_tensors(adapter: Any, name: str) -> dict[str, np.ndarray]:
    """PEFT's keys and tensors for a linear, embedding or conv module."""
    m = adapter.config.modules[name]
    a, b = adapter.lora_A(name), adapter.lora_B(name)
    key = KEY_PREFIX + name
    if m.kind == "embedding":
        return {f"{key}.lora_embedding_A": a, f"{key}.lora_embedding_B": b}
    if m.kind == "conv":
        kernel = tuple(m.kernel)
        c_in = m.d_in // int(np.prod(kernel))
        a = a.reshape(a.shape[0], c_in, *kernel)
        b = b.reshape(*b.shape, *(1,) * len(kernel))
    return {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}


def _parameter_tensors(adapter: Any, name: str, depth: int) -> dict[str, np.ndarray]:
    """PEFT ``ParamWrapper`` keys and tensors of parameter ``name`` wrapped ``depth``
    levels inside the outermost wrapper of its module."""
    m = adapter.config.modules[name]
    if m.transposed and m.experts is None:
        raise ValueError(
            f"{adapter.path}: module {name!r} is a transposed 2-D parameter, which PEFT "
            "cannot express (its is_transposed applies to 3-D parameters only)"
        )
    a, b = adapter.lora_A(name), adapter.lora_B(name)
    if m.experts is not None:
        experts, d_out, r = b.shape
        a = a.reshape(experts * r, m.d_in)
        # PEFT's lora_B (d_out, r * E): column k * E + e is expert e's column k
        b = np.ascontiguousarray(b.transpose(1, 2, 0)).reshape(d_out, r * experts)
    module = name.rpartition(".")[0]
    key = KEY_PREFIX + module + ".base_layer" * depth
    return {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}


# Order transformers' MoE expert modules register their parameters in (the core's rule,
# which its PEFT reader follows too).
_EXPERT_PARAMETER_ORDER = tuple(_native.PEFT_PARAMETER_ORDER)


def _parameter_order(names: list[str], model: Any) -> dict[str, int]:
    """Parameter modules in the order to list them in ``target_parameters`` (each
    module's parameters in its registration order), with their nesting depth: PEFT
    wraps a module's parameters in that order, so the last is outermost (depth 0)."""
    by_module: dict[str, list[str]] = {}
    for name in names:
        module, _, param = name.rpartition(".")
        if not module:
            raise ValueError(
                f"parameter {name!r} belongs to no module; PEFT targets module parameters"
            )
        by_module.setdefault(module, []).append(param)
    out: dict[str, int] = {}
    for module, params in by_module.items():
        if model is not None:
            order = [n for n, _ in model.get_submodule(module).named_parameters(recurse=False)]
            missing = [p for p in params if p not in order]
            if missing:
                raise ValueError(f"module {module!r} of the model has no parameter {missing[0]!r}")
            params.sort(key=order.index)
        else:
            known = _EXPERT_PARAMETER_ORDER
            params.sort(key=lambda p: (known.index(p) if p in known else len(known), p))
        for i, param in enumerate(params):
            out[f"{module}.{param}"] = len(params) - 1 - i
    return out


def _modules_to_save(full_tensors: Iterable[str], modules: list[str], path: Path) -> list[str]:
    """PEFT ``modules_to_save``: the modules owning the full tensors (state-dict names)."""
    saved: list[str] = []
    for tensor in full_tensors:
        owner = tensor.rpartition(".")[0]
        if not owner:
            raise ValueError(
                f"{path}: full tensor {tensor!r} belongs to no submodule; PEFT can only save "
                "whole modules (modules_to_save)"
            )
        if owner not in saved:
            saved.append(owner)
    for owner in saved:
        for module in modules:
            if module == owner or module.startswith(owner + ".") or owner.startswith(module + "."):
                raise ValueError(
                    f"{path}: full tensors of {owner!r} overlap the adapted module {module!r}; "
                    "PEFT cannot both adapt and fully save one module"
                )
    return saved


def _patterns(cfg: AdapterConfig, modules: list[str]) -> tuple[dict[str, int], dict[str, Any]]:
    """PEFT ``rank_pattern``/``alpha_pattern`` giving every module its own rank and alpha.

    Keys are the plain module names: PEFT's rule (a regex matched against the module
    name's tail at a dot boundary, and in older PEFT an exact-name lookup) maps each to
    its module. Should a plain name also match another module, the keys become anchored
    escaped regexes instead; the result is checked with PEFT's rule either way.
    """
    ranks = {n: cfg.module_rank(n) for n in modules}
    alphas = {n: cfg.module_alpha(n) for n in modules}
    rank_over = {n: r for n, r in ranks.items() if r != cfg.rank}
    alpha_over = {n: a for n, a in alphas.items() if a != cfg.alpha}
    for anchored in (False, True):
        keys = {n: f"^{re.escape(n)}$" if anchored else n for n in modules}
        rank_pattern = {keys[n]: r for n, r in rank_over.items()}
        alpha_pattern = {keys[n]: _number(a) for n, a in alpha_over.items()}
        if all(
            pattern_value(rank_pattern, n, cfg.rank) == ranks[n]
            and float(pattern_value(alpha_pattern, n, cfg.alpha)) == alphas[n]
            for n in modules
        ):
            return rank_pattern, alpha_pattern
    raise AssertionError("anchored rank/alpha patterns always select their own module")


def _auto_mapping(class_name: object) -> dict[str, str] | None:
    """PEFT's ``auto_mapping`` (lets ``AutoPeftModel`` find the base class), if resolvable.

    Looks the class up in transformers' lazy import table (no torch import); falls back
    to importing the class. ``None`` when transformers or the class is unknown.
    """
    if not isinstance(class_name, str) or not class_name.isidentifier():
        return None
    try:
        import transformers

        table = getattr(transformers, "_class_to_module", None)
        if isinstance(table, Mapping) and isinstance(table.get(class_name), str):
            module = f"transformers.{table[class_name]}"
        else:
            module = getattr(getattr(transformers, class_name), "__module__", None)
    except Exception:  # best effort: the mapping is optional
        return None
    if not isinstance(module, str):
        return None
    return {"base_model_class": class_name, "parent_library": module}


# --------------------------------------------------------------------------- import


def import_peft(peft_dir: PathLike, path: PathLike, *, seed: int = 0) -> Path:
    """Converts the PEFT LoRA directory ``peft_dir`` into an asymlora adapter file ``path``.

    The directory is read by the core's PEFT reader, the same one ``asymlora merge`` and
    :func:`asymlora.merge_files` use, so a directory is accepted or refused alike by all
    three, with the same exception and message. Every ``A`` is stored (``a_stored``), so
    the seed does not matter for the factors. Ranks come from the tensor shapes and must
    agree with PEFT's ``r``/``rank_pattern``; alphas follow ``lora_alpha``/``alpha_pattern``
    with PEFT's matching rule; ``use_rslora`` becomes scaling ``"alpha/sqrt(r)"``. Float
    tensors of ``modules_to_save`` become full tensors under the model's state-dict names
    (``classifier.weight``), and ``base_model`` records ``class``, ``name_or_path``,
    ``revision`` and ``fan_in_fan_out``. Embedding (``lora_embedding_A``/``B``), conv and
    ``target_parameters`` (``ParamWrapper``) LoRA become modules of kind ``"embedding"``,
    ``"conv"`` and ``"parameter"`` (named by the full parameter name; experts' factors as
    ``(E, r, d_in)`` and ``(E, d_out, r)``). A PEFT directory does not record a parameter's
    ``is_transposed``; parameters are read as ``[E, d_out, d_in]`` (Mixtral, Qwen3-MoE).
    Nested wrappers of one module are taken to follow transformers' experts order
    (``gate_up_proj``, ``gate_proj``, ``up_proj``, then ``down_proj``, others by name): PEFT
    saves ``target_parameters`` in no fixed order.
    Dtypes are kept bit for bit. Load the result with
    :func:`asymlora.load_adapter` into the same base model. Integer tensors of
    ``modules_to_save`` (counters such as BatchNorm's ``num_batches_tracked``) are
    skipped with a warning, as ``save_adapter`` skips them.

    PEFT saves an adapter with a non-default name in a subdirectory named after it; pass
    that subdirectory. Adapters whose initialisation rewrote the base weights (PiSSA,
    OLoRA, CorDA, LoftQ, unless converted when saved) need that rewritten base model, as
    with PEFT itself; a warning says so.

    Args:
        peft_dir: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
            (or that ``adapter_model.safetensors`` itself).
        path: the adapter file to write (atomically; an existing file is replaced).
        seed: the adapter seed recorded in the file, ``0 <= seed < 2**64``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        FileNotFoundError: ``peft_dir`` does not exist.
        AdapterFormatError: the directory is not a plain PEFT LoRA adapter asymlora can
            hold (a ``ValueError``): another PEFT method, DoRA or another LoRA variant,
            ``bias`` other than ``"none"``, only a pickled ``adapter_model.bin``,
            non-float (quantised) factors, unrecognised
            tensor names, or ranks that disagree with the config. Nothing is written then.
    """
    check_uint("seed", seed)
    for message in _native.import_peft(os.fspath(peft_dir), os.fspath(path), seed):
        warnings.warn(message, stacklevel=2)
    return Path(path)


# --------------------------------------------------------------------------- shared


def _number(value: float) -> int | float:
    """An integral float as a JSON integer (PEFT writes ``"lora_alpha": 16``)."""
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _natural_key(name: str) -> list[Any]:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
