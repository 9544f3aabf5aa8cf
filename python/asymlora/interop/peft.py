"""Hugging Face PEFT interop: export an adapter as a PEFT LoRA directory, import one back.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors``.
Each adapted module ``{m}`` (a name from the base model's ``named_modules()``) has the
tensors ``base_model.model.{m}.lora_A.weight`` (r x d_in) and
``base_model.model.{m}.lora_B.weight`` (d_out x r); the update is ``s * B @ A`` with
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), exactly as in an
asymlora adapter. PEFT stores the tensors of ``modules_to_save`` under
``base_model.model.`` plus their state-dict name in the base model (for example
``base_model.model.classifier.weight``), without the adapter name.

Neither function needs torch: the safetensors files are read and written here with
numpy (``ml_dtypes.bfloat16`` for bf16), so every dtype, bf16 included, round-trips bit
for bit. (Export looks the base-model class up in transformers, if installed, for PEFT's
``auto_mapping``.) A pickled ``adapter_model.bin`` is never opened.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asymlora._dtypes import SAFETENSORS_TO_NUMPY
from asymlora._safetensors import SafetensorsFile, write_safetensors
from asymlora._validate import list_problems
from asymlora.adapter import AdapterConfig, ModuleConfig, PathLike, read_adapter, write_adapter

__all__ = ["export_peft", "import_peft"]

#: file names of a PEFT adapter directory
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

#: prefix PEFT gives every tensor key when saving a ``PeftModel``
KEY_PREFIX = "base_model.model."

# What ``PeftModel.save_pretrained`` may leave in an adapter directory: the only
# entries an ``overwrite=True`` export replaces.
_PEFT_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, "README.md"})

# LoRA config fields that change what the adapter computes (or the model it applies
# to) beyond ``W + s * B @ A`` on linear layers: field -> what it enables.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trained bias on lora_B",
    "alora_invocation_tokens": "activated LoRA (aLoRA), applied only after invocation tokens",
    "use_qalora": "QA-LoRA (pooled inputs on quantised layers)",
    "layer_replication": "layer replication (changes the base model's layer stack)",
    "trainable_token_indices": "trainable tokens (embedding deltas)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA (a learned singular-value diagonal and a truncated base weight)",
    "monteclora_config": "MonteCLoRA (variational sampling)",
}

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
_NAMED_LORA_KEY = re.compile(r"\.lora_[AB]\.(?P<adapter>[^.]+)\.weight$")


# --------------------------------------------------------------------------- export


def export_peft(
    adapter_path: PathLike,
    out_dir: PathLike,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
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

    tensors: dict[str, np.ndarray] = {}
    for name in modules:
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = adapter.lora_A(name)
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = adapter.lora_B(name)
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
        "target_modules": modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": cfg.scaling == "alpha/sqrt(r)",
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
    alphas = {n: _module_alpha(cfg, n) for n in modules}
    rank_over = {n: r for n, r in ranks.items() if r != cfg.rank}
    alpha_over = {n: a for n, a in alphas.items() if a != cfg.alpha}
    for anchored in (False, True):
        keys = {n: f"^{re.escape(n)}$" if anchored else n for n in modules}
        rank_pattern = {keys[n]: r for n, r in rank_over.items()}
        alpha_pattern = {keys[n]: _number(a) for n, a in alpha_over.items()}
        if all(
            _pattern_value(rank_pattern, n, cfg.rank) == ranks[n]
            and float(_pattern_value(alpha_pattern, n, cfg.alpha)) == alphas[n]
            for n in modules
        ):
            return rank_pattern, alpha_pattern
    raise AssertionError("anchored rank/alpha patterns always select their own module")


def _module_alpha(cfg: AdapterConfig, module: str) -> float:
    alpha = cfg.modules[module].alpha
    return float(cfg.alpha if alpha is None else alpha)


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


@dataclass
class _Factors:
    a: str | None = None
    b: str | None = None


def import_peft(peft_dir: PathLike, path: PathLike, *, seed: int = 0) -> Path:
    """Converts the PEFT LoRA directory ``peft_dir`` into an asymlora adapter file ``path``.

    Every ``A`` is stored (``a_stored``), so the seed does not matter for the factors.
    Ranks come from the tensor shapes and must agree with PEFT's ``r``/``rank_pattern``;
    alphas follow ``lora_alpha``/``alpha_pattern`` with PEFT's matching rule;
    ``use_rslora`` becomes scaling ``"alpha/sqrt(r)"``. Tensors of ``modules_to_save``
    become full tensors under the model's state-dict names (``classifier.weight``), and
    ``base_model`` records ``name_or_path`` and ``fan_in_fan_out``. Dtypes are kept bit
    for bit. Load the result with :func:`asymlora.load_adapter` into the same base model.
    Integer tensors of ``modules_to_save`` (counters such as BatchNorm's
    ``num_batches_tracked``) are skipped with a warning, as ``save_adapter`` skips them.

    PEFT saves an adapter with a non-default name in a subdirectory named after it; pass
    that subdirectory. Adapters whose initialisation rewrote the base weights (PiSSA,
    OLoRA, CorDA, LoftQ, unless converted when saved) need that rewritten base model, as
    with PEFT itself.

    Args:
        peft_dir: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        path: the adapter file to write (atomically; an existing file is replaced).
        seed: the adapter seed recorded in the file, ``0 <= seed < 2**64``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        FileNotFoundError: ``peft_dir`` does not exist.
        ValueError: the directory is not a plain PEFT LoRA adapter asymlora can hold:
            another PEFT method, DoRA or another LoRA variant, ``bias`` other than
            ``"none"``, only a pickled ``adapter_model.bin``, embedding or convolution
            LoRA, non-float (quantised) tensors, unrecognised tensor names, or ranks that
            disagree with the config. Nothing is written then.
    """
    src = Path(peft_dir)
    config = _read_peft_config(src)
    _check_supported(config, src)
    weights = _weights_file(src)
    st = SafetensorsFile(weights)

    rank = _config_int(config, "r", 8, src)
    alpha = _config_float(config, "lora_alpha", 8.0, src)
    rank_pattern = _config_mapping(config, "rank_pattern", src)
    alpha_pattern = _config_mapping(config, "alpha_pattern", src)
    saved_targets = config.get("modules_to_save") or []
    if isinstance(saved_targets, str) or not all(isinstance(t, str) for t in saved_targets):
        raise ValueError(f"{src / CONFIG_NAME}: modules_to_save must be a list of module names")

    factors, full, skipped, problems = _classify_keys(st, saved_targets)
    modules, tensors_to_read = _module_configs(
        st, factors, rank, alpha, rank_pattern, alpha_pattern, problems
    )
    if problems:
        raise ValueError(
            f"{src} cannot be imported ({len(problems)} problem(s)); nothing was written:"
            f"{list_problems(problems)}"
        )
    for key in skipped:
        warnings.warn(
            f"{weights}: skipping the integer tensor {key} ({st.entries[key].dtype}) of "
            "modules_to_save; asymlora adapters hold float tensors only",
            stacklevel=2,
        )
    tensors_to_read.update(full)

    base_model: dict[str, Any] = {}
    auto_mapping = config.get("auto_mapping")
    if isinstance(auto_mapping, Mapping) and isinstance(auto_mapping.get("base_model_class"), str):
        base_model["class"] = auto_mapping["base_model_class"]
    for field_name, ours in (("base_model_name_or_path", "name_or_path"), ("revision", "revision")):
        value = config.get(field_name)
        if isinstance(value, str) and value:
            base_model[ours] = value
    base_model["fan_in_fan_out"] = bool(config.get("fan_in_fan_out", False))

    adapter_config = AdapterConfig(
        rank=rank,
        alpha=alpha,
        seed=seed,
        modules=modules,
        scaling="alpha/sqrt(r)" if config.get("use_rslora") else "alpha/r",
        full_tensors=tuple(full),
        base_model=base_model,
    )
    arrays = st.read(tensors_to_read)
    write_adapter(path, adapter_config, arrays)
    return Path(path)


def _classify_keys(
    st: SafetensorsFile, saved_targets: list[str]
) -> tuple[dict[str, _Factors], dict[str, str], list[str], list[str]]:
    """Sorts the file's tensors into LoRA factors per module, full tensors
    (``{state-dict name: key}``), skipped integer tensors and problems."""
    factors: dict[str, _Factors] = {}
    full: dict[str, str] = {}
    skipped: list[str] = []
    problems: list[str] = []
    for key in st.names:
        name = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
        dtype = st.entries[key].dtype
        problem = _refused_key(name)
        match = _LORA_KEY.match(name)
        if problem:
            problems.append(f"{key}: {problem}")
        elif match:
            entry = factors.setdefault(match["module"], _Factors())
            factor = match["factor"].lower()
            if getattr(entry, factor) is not None:
                problems.append(f"{key}: the factor is in the file twice (with and without prefix)")
            setattr(entry, factor, key)
        elif _in_modules_to_save(name, saved_targets):
            if name in full:
                problems.append(f"{key}: the tensor is in the file twice (with and without prefix)")
            elif dtype in SAFETENSORS_TO_NUMPY:
                full[name] = key
            elif dtype in _INTEGER_CODES:
                skipped.append(key)
            else:
                problems.append(f"{key}: dtype {dtype} is not a float dtype")
        else:
            named = _NAMED_LORA_KEY.search(name)
            hint = (
                f" (it carries the adapter name {named['adapter']!r}: a raw model state dict, "
                "not what PeftModel.save_pretrained writes)"
                if named
                else " (neither a LoRA factor nor a tensor of modules_to_save)"
            )
            problems.append(f"{key}: unrecognised tensor name{hint}")
    if not factors and not problems:
        problems.append("no LoRA factors (*.lora_A.weight / *.lora_B.weight) in the file")
    return factors, full, skipped, problems


def _module_configs(
    st: SafetensorsFile,
    factors: Mapping[str, _Factors],
    rank: int,
    alpha: float,
    rank_pattern: Mapping[str, Any],
    alpha_pattern: Mapping[str, Any],
    problems: list[str],
) -> tuple[dict[str, ModuleConfig], dict[str, str]]:
    """One module entry (every ``A`` stored) per module whose factors pass the checks, and
    ``{our tensor name: key}``; appends what fails to ``problems``."""
    modules: dict[str, ModuleConfig] = {}
    tensors_to_read: dict[str, str] = {}  # our name -> key in the file
    for stream, module in enumerate(sorted(factors, key=_natural_key)):
        entry = factors[module]
        if entry.a is None or entry.b is None:
            missing = "lora_A" if entry.a is None else "lora_B"
            problems.append(f"{module}: {missing}.weight is missing")
            continue
        a, b = st.entries[entry.a], st.entries[entry.b]
        bad_dtype = [e for e in (a, b) if e.dtype not in SAFETENSORS_TO_NUMPY]
        if bad_dtype:
            codes = ", ".join(sorted({e.dtype for e in bad_dtype}))
            problems.append(
                f"{module}: factor dtype {codes} is not F16/BF16/F32/F64 "
                "(quantised LoRA factors are not supported)"
            )
            continue
        if len(a.shape) != 2 or len(b.shape) != 2:
            problems.append(
                f"{module}: factors of shape {list(a.shape)} and {list(b.shape)} are not "
                "matrices (convolution LoRA is not supported)"
            )
            continue
        r, d_in = a.shape
        d_out, r_b = b.shape
        if r != r_b or r == 0 or d_in == 0 or d_out == 0:
            problems.append(
                f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not form "
                "a rank-r product"
            )
            continue
        expected = _pattern_value(rank_pattern, module, rank)
        if r != expected:
            problems.append(
                f"{module}: the factors have rank {r} but the config gives {expected} "
                "(r / rank_pattern); PEFT could not load this adapter"
            )
            continue
        module_alpha = float(_pattern_value(alpha_pattern, module, alpha))
        modules[module] = ModuleConfig(
            d_in=d_in,
            d_out=d_out,
            stream=stream,
            a_stored=True,
            rank=None if r == rank else r,
            alpha=None if module_alpha == alpha else module_alpha,
        )
        tensors_to_read[f"{module}.lora_A"] = entry.a
        tensors_to_read[f"{module}.lora_B"] = entry.b
    return modules, tensors_to_read


def _read_peft_config(src: Path) -> dict[str, Any]:
    if not src.exists():
        raise FileNotFoundError(f"PEFT adapter directory {src} does not exist")
    if not src.is_dir():
        raise ValueError(f"{src} is not a directory; pass a PEFT adapter directory")
    config_path = src / CONFIG_NAME
    if not config_path.is_file():
        nested = sorted(p.name for p in src.iterdir() if (p / CONFIG_NAME).is_file())
        if nested:
            raise ValueError(
                f"{src} has no {CONFIG_NAME} but holds adapters in subdirectories {nested} "
                "(PEFT saves adapters with a non-default name there); pass one of them"
            )
        raise ValueError(f"{src} has no {CONFIG_NAME}; it is not a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} does not hold a JSON object")
    return config


def _check_supported(config: Mapping[str, Any], src: Path) -> None:
    where = src / CONFIG_NAME
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"{where}: peft_type is {peft_type!r}; only LoRA adapters (peft_type 'LORA') "
            "can be imported"
        )
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise ValueError(
            f"{where}: bias={bias!r} trains biases of the base model; only bias='none' "
            "can be imported"
        )
    for field_name, what in _UNSUPPORTED_FIELDS.items():
        if config.get(field_name):
            raise ValueError(
                f"{where}: {field_name}={config[field_name]!r} enables {what}, which asymlora "
                "adapters cannot hold"
            )


def _weights_file(src: Path) -> Path:
    weights = src / WEIGHTS_NAME
    if weights.is_file():
        return weights
    if (src / PICKLE_WEIGHTS_NAME).exists():
        raise ValueError(
            f"{src} holds only {PICKLE_WEIGHTS_NAME}, a pickle, which asymlora never loads "
            "(unpickling can run arbitrary code); re-save the adapter with "
            f"save_pretrained(..., safe_serialization=True) to get {WEIGHTS_NAME}"
        )
    raise ValueError(f"{src} has no {WEIGHTS_NAME}")


def _refused_key(name: str) -> str | None:
    """Why a (prefix-stripped) tensor name is refused outright, or ``None``."""
    if "lora_magnitude_vector" in name:
        return "DoRA magnitude vector (DoRA adapters are not supported)"
    if re.search(r"(^|\.)lora_embedding_[AB](\.|$)", name):
        return "embedding LoRA (LoRA on nn.Embedding is not supported)"
    if re.search(r"\.lora_B\.bias$", name):
        return "a bias on lora_B (lora_bias is not supported)"
    return None


def _in_modules_to_save(name: str, targets: Iterable[str]) -> bool:
    """Whether PEFT's ``modules_to_save`` rule (a module name ending with a target) owns it."""
    parts = name.split(".")
    owners = [".".join(parts[:i]) for i in range(1, len(parts))]
    return any(owner.endswith(t) for owner in owners for t in targets)


def _config_int(config: Mapping[str, Any], key: str, default: int, src: Path) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{src / CONFIG_NAME}: {key} must be a positive integer, got {value!r}")
    return value


def _config_float(config: Mapping[str, Any], key: str, default: float, src: Path) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{src / CONFIG_NAME}: {key} must be a finite number, got {value!r}")
    return float(value)


def _config_mapping(config: Mapping[str, Any], key: str, src: Path) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{src / CONFIG_NAME}: {key} must be an object, got {value!r}")
    for pattern, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError(f"{src / CONFIG_NAME}: {key}[{pattern!r}] must be a number")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(
                f"{src / CONFIG_NAME}: {key} key {pattern!r} is not a valid regex: {exc}"
            ) from None
    return dict(value)


# --------------------------------------------------------------------------- shared


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` rule: the first key (a regex) matching the tail of
    ``name`` after a dot, else an exact-name lookup, else ``default``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return patterns.get(name, default)


def _number(value: float) -> int | float:
    """An integral float as a JSON integer (PEFT writes ``"lora_alpha": 16``)."""
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _natural_key(name: str) -> list[Any]:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------- safetensors

_INTEGER_CODES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
