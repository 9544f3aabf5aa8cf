"""Training configuration of an asymmetric LoRA (torch-free, so it can be built anywhere)."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, Union

from asymlora import _native
from asymlora._validate import check_finite, check_uint

TRAIN_MODES = ("B", "A", "AB")
A_INITS = ("orthogonal", "kaiming")

#: ``target_modules`` value that selects every linear layer except the output head, as in PEFT.
ALL_LINEAR = "all-linear"

TargetModules = Union[str, Sequence[str], None]
V = TypeVar("V")


@dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how; the argument of :func:`asymlora.wrap`.

    Args:
        r: rank of every adapter (``rank_pattern`` overrides it per module).
        alpha: numerator of the scale ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        target_modules: module-name suffixes (``["q_proj", "v_proj"]`` matches
            ``model.layers.0.self_attn.q_proj``), a regex matched against the full
            name (a ``str``), or ``"all-linear"``.
        train: ``"B"`` trains only ``B``; ``A`` is frozen, random orthogonal from
            (seed, module stream), and never stored. ``"A"`` trains only ``A``
            (initialised to zero); ``B`` is frozen random (orthonormal columns from the
            generator). ``"AB"`` is classic LoRA (``B`` starts at zero).
        a_init: ``"orthogonal"`` (the generator) or ``"kaiming"`` (PEFT's default
            Kaiming-uniform, seeded; such an ``A`` is stored in the adapter file).
        seed: adapter seed, ``0 <= seed < 2**64``.
        dropout: dropout on the adapter branch input (PEFT's ``lora_dropout``).
        rslora: use ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        modules_to_save: names (suffixes) of modules trained in full and saved with the
            adapter, e.g. a classifier head.
        rank_pattern: module-name pattern -> rank, as in PEFT.
        alpha_pattern: module-name pattern -> alpha, as in PEFT.
        target_parameters: parameter names (PEFT's ``target_parameters``): a parameter
            is selected when its full name equals an entry or ends with ``"." + entry``
            (``["experts.gate_up_proj", "experts.down_proj"]``). 2-D parameters are
            adapted as one matrix, 3-D ones ``(E, d_out, d_in)`` (MoE experts) with one
            ``A_e``, ``B_e`` per expert; see ``docs/experts.md``. With them,
            ``target_modules`` may be ``None`` or empty (only parameters adapted);
            ``dropout`` must be 0 (as in PEFT: the update is added to the weight, there is
            no branch input to drop).
    """

    r: int = 8
    alpha: float = 16.0
    target_modules: TargetModules = ("q_proj", "v_proj")
    train: str = "B"
    a_init: str = "orthogonal"
    seed: int = 0
    dropout: float = 0.0
    rslora: bool = False
    modules_to_save: Sequence[str] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    target_parameters: Sequence[str] = ()

    def __post_init__(self) -> None:
        check_uint("LoraConfig.r", self.r, minimum=1)
        check_finite("LoraConfig.alpha", self.alpha)
        check_uint("LoraConfig.seed", self.seed)
        if self.train not in TRAIN_MODES:
            raise ValueError(f"LoraConfig.train must be one of {TRAIN_MODES}, got {self.train!r}")
        if self.a_init not in A_INITS:
            raise ValueError(f"LoraConfig.a_init must be one of {A_INITS}, got {self.a_init!r}")
        if self.train == "A" and self.a_init != "orthogonal":
            raise ValueError(
                "LoraConfig.a_init applies to a frozen or classic A; train='A' starts A at zero"
            )
        dropout = check_finite("LoraConfig.dropout", self.dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {dropout}")
        self._check_target_parameters(dropout)
        if isinstance(self.target_modules, str):
            if self.target_modules != ALL_LINEAR:
                _compile("LoraConfig.target_modules", self.target_modules)
        else:
            modules = () if self.target_modules is None else tuple(self.target_modules)
            object.__setattr__(self, "target_modules", modules)
            if not modules and not self.target_parameters:
                raise ValueError("LoraConfig.target_modules is empty (and no target_parameters)")
        if isinstance(self.modules_to_save, str):
            raise ValueError("LoraConfig.modules_to_save must be a list of names, not a string")
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        for key, rank in self.rank_pattern.items():
            check_uint(f"LoraConfig.rank_pattern[{key!r}]", rank, minimum=1)
        for key, alpha in self.alpha_pattern.items():
            check_finite(f"LoraConfig.alpha_pattern[{key!r}]", alpha)
        _pattern_rule(tuple(self.rank_pattern), "LoraConfig.rank_pattern")
        _pattern_rule(tuple(self.alpha_pattern), "LoraConfig.alpha_pattern")

    def _check_target_parameters(self, dropout: float) -> None:
        if isinstance(self.target_parameters, str):
            raise ValueError(
                "LoraConfig.target_parameters must be a list of parameter names, not a string"
            )
        names = tuple(self.target_parameters)
        object.__setattr__(self, "target_parameters", names)
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise ValueError(f"LoraConfig.target_parameters has an empty or non-str {bad[0]!r}")
        if names and dropout > 0:
            raise ValueError(
                f"LoraConfig.dropout={dropout} cannot apply to target_parameters (the update "
                "is added to the parameter, there is no branch input to drop; PEFT refuses it "
                "too); use dropout=0"
            )

    def targets_parameter(self, name: str) -> bool:
        """Whether the parameter called ``name`` (full name) is selected by
        ``target_parameters`` (PEFT's rule: equal, or ending with ``"." + entry``)."""
        return any(suffix_matches(name, t) for t in self.target_parameters)

    @property
    def a_frozen(self) -> bool:
        return self.train == "B"

    @property
    def a_regenerable(self) -> bool:
        """True when every ``A`` is the generator's output and stays so (never stored)."""
        return self.train == "B" and self.a_init == "orthogonal"

    def targets(self, name: str) -> bool:
        """Whether the module called ``name`` is selected by ``target_modules``."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(suffix_matches(name, t) for t in self.target_modules)

    def saves(self, name: str) -> bool:
        """Whether ``name`` is one of ``modules_to_save``."""
        return any(suffix_matches(name, t) for t in self.modules_to_save)

    def rank_for(self, name: str) -> int:
        """The rank of module ``name``: the first ``rank_pattern`` key selecting it, else ``r``."""
        return int(pattern_value(self.rank_pattern, name, self.r))

    def alpha_for(self, name: str) -> float:
        """The alpha of module ``name``: the first ``alpha_pattern`` key selecting it,
        else ``alpha``."""
        return float(pattern_value(self.alpha_pattern, name, self.alpha))

    def scale_for(self, name: str) -> float:
        """``s`` in ``W + s * B @ A`` for module ``name`` (the core's scaling rule)."""
        return _native.scale(self.scaling, self.alpha_for(name), self.rank_for(name))

    @property
    def scaling(self) -> str:
        """The adapter-file name of the scaling rule."""
        return _native.scaling_name(self.rslora)


def suffix_matches(name: str, target: str) -> bool:
    """PEFT's list rule: the full name, or its tail after a dot."""
    return name == target or name.endswith("." + target)


def pattern_value(patterns: Mapping[str, V], name: str, default: V) -> V:
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule (the core's): the value of the first
    key, in insertion order, whose regex matches the end of ``name`` at a dot boundary,
    else ``default``."""
    if not patterns:
        return default
    keys = tuple(patterns)
    index = _pattern_rule(keys).first_match(name)
    return default if index is None else patterns[keys[index]]


@functools.lru_cache(maxsize=256)
def _pattern_rule(keys: tuple[str, ...], what: str = "pattern") -> _native.PatternRule:
    return _native.PatternRule(list(keys), what)


def _compile(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {exc}") from None
