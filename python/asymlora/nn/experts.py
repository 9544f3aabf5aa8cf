"""Adapting parameters directly: ``LoraConfig(target_parameters=[...])``, PEFT's
``target_parameters`` (MoE experts stored as 3-D tensors, or any 2-D parameter).

A selected parameter ``W`` of a module (the *owner*, e.g. transformers 5's
``MixtralExperts`` with ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I)) is viewed
as ``E`` matrices ``W_e`` (d_out x d_in; one for a 2-D parameter), each with its own
factors: ``A_e`` (r x d_in, for a frozen orthogonal ``A`` the generator's output for stream
``module stream + e``) and ``B_e`` (d_out x r). The model's own code keeps computing with
``W_e + s * B_e @ A_e``:

- the owner is replaced by a :class:`ParametersWrapper` that holds it as ``base_layer``
  and, under the parameter's own name, one :class:`ParamLoraLayer` per adapted parameter
  (so the adapter module ``model.layers.0.mlp.experts.gate_up_proj`` is that layer, and
  its factors are ``...gate_up_proj.lora_A`` / ``lora_B``, as in the adapter file);
- its forward calls the owner (arguments passed through) with each adapted parameter
  replaced for that call by ``W + s * B @ A`` (one ``baddbmm``, in ``W``'s dtype), via
  ``torch.func.functional_call``: nothing is registered on the owner, so no
  ``parametrizations.*`` state is ever left behind, and gradients reach only the
  trained factors.

A :class:`ParamLoraLayer` is a :class:`~asymlora.nn.layer.LoraLayer`: merging, several
adapters, ``disable_adapters``, saving and loading treat it like any adapted layer. A
mixed batch (``per_sample_adapters``) cannot route rows through per-row weights and is
refused, as PEFT does.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from asymlora.lora_config import ALL_LINEAR, LoraConfig
from asymlora.nn.base import FLOAT, BaseInfo
from asymlora.nn.layer import DEFAULT_ADAPTER, AdapterView, LoraLayer
from asymlora.nn.model import lora_layers, replace_module
from asymlora.nn.routing import DisabledRoute
from asymlora.nn.targets import Target, find_targets

#: the adapter-file ``kind`` of an adapted parameter
PARAMETER_KIND = "parameter"
#: the parameter ranks that can be adapted: one matrix, or a stack of expert matrices
SUPPORTED_NDIM = (2, 3)


@dataclass(frozen=True)
class ParamTarget(Target):
    """A parameter that can be adapted: ``name`` is its full name, ``module`` its owner."""

    #: the owner module's name in the model
    owner_name: str = ""
    #: the parameter's attribute name in the owner
    param_name: str = ""
    #: ``E`` for a 3-D parameter (E, ...), ``None`` for a 2-D one
    experts: int | None = None
    #: True when each block is stored d_in x d_out (the owner's ``is_transposed``, PEFT's rule)
    transposed: bool = False


def expert_count(target: Target) -> int | None:
    """``E`` of a 3-D parameter target, else ``None`` (one matrix)."""
    return target.experts if isinstance(target, ParamTarget) else None


def stream_width(target: Target) -> int:
    """How many generator streams ``target`` takes: one per expert (expert ``e`` of a
    module at stream ``s`` uses ``s + e``), one for a matrix."""
    return expert_count(target) or 1


def factor_shapes(target: Target, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of ``A`` and ``B`` of ``target`` at ``rank``: ``(r, d_in)``, ``(d_out, r)``,
    with a leading ``E`` for a 3-D parameter."""
    experts = expert_count(target)
    lead = () if experts is None else (experts,)
    return (*lead, rank, target.d_in), (*lead, target.d_out, rank)


# --- finding the targets ----------------------------------------------------------------


def find_all_targets(
    model: nn.Module, config: LoraConfig, *, adapted: bool = False
) -> list[Target]:
    """The modules (:func:`~asymlora.nn.targets.find_targets`) and then the parameters
    (:func:`find_parameter_targets`) ``config`` selects, checked; warns once when
    ``"all-linear"`` leaves 3-D expert parameters out.

    Raises:
        ValueError: as ``find_targets``; a ``target_parameters`` entry matches nothing,
            a matched parameter is not 2-D or 3-D, or its owner is also a target module.
    """
    modules = find_targets(model, config, adapted=adapted) if config.target_modules else []
    params = find_parameter_targets(model, config, adapted=adapted)
    owners = {t.owner_name for t in params}
    clash = sorted(t.name for t in modules if t.name in owners)
    if clash:
        raise ValueError(
            f"{clash[0]} is selected by target_modules and owns a parameter selected by "
            "target_parameters; adapt it one way only"
        )
    if config.target_modules == ALL_LINEAR:
        _warn_uncovered(model, {t.name for t in params})
    return [*modules, *params]


def find_parameter_targets(
    model: nn.Module, config: LoraConfig, *, adapted: bool = False
) -> list[ParamTarget]:
    """The parameters ``config.target_parameters`` selects, in ``named_modules`` order.

    With ``adapted``, a parameter already adapted (by another adapter) can be selected.

    Raises:
        ValueError: one line naming an entry that matches no parameter, or the first
            matched parameter that cannot be adapted (rank not 2 or 3, already adapted,
            a parameter of the root module, a rank exceeding a dimension).
    """
    if not config.target_parameters:
        return []
    found = [c for c in parameter_candidates(model) if config.targets_parameter(c[0])]
    unmatched = [t for t in config.target_parameters if not any(_matches(c[0], t) for c in found)]
    if unmatched:
        raise ValueError(
            f"target_parameters entry {unmatched[0]!r} matches no parameter of "
            f"{type(model).__name__} (a full parameter name or its tail after a dot, "
            "e.g. 'mlp.experts.gate_up_proj')"
        )
    targets = []
    for name, owner_name, owner, param_name, wrapped in found:
        target = as_parameter_target(name, owner_name, owner, param_name)
        problem = target if isinstance(target, str) else None
        if problem is None and wrapped and not adapted:
            problem = "already adapted"
        if problem is None:
            rank, smallest = config.rank_for(name), min(target.d_in, target.d_out)
            if rank > smallest:
                problem = f"rank {rank} exceeds min(d_in, d_out) = {smallest}"
        if problem is not None:
            raise ValueError(f"cannot adapt parameter {name}: {problem}")
        targets.append(target)
    return targets


def parameter_candidates(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, str, bool]]:
    """``(full name, owner name, owner, attribute name, already adapted)`` of every
    parameter that ``target_parameters`` may select: a parameter's name is the one the
    plain model gives it (an owner inside a :class:`ParametersWrapper` keeps its name);
    parameters inside adapted layers (factors, base weights) are not candidates."""
    skip: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(module, LoraLayer):
            skip = (name + ".",) if name else ("",)
            continue
        wrapped = isinstance(module, ParametersWrapper)
        if wrapped:
            owner, owner_name = module.base_layer, name
            skip = (f"{name}.base_layer",) if name else ("base_layer",)
        else:
            owner, owner_name = module, name
        for param_name, _ in owner.named_parameters(recurse=False):
            full = f"{owner_name}.{param_name}" if owner_name else param_name
            yield full, owner_name, owner, param_name, wrapped and param_name in module._modules


def as_parameter_target(
    name: str, owner_name: str, owner: nn.Module, param_name: str
) -> ParamTarget | str:
    """Parameter ``param_name`` of ``owner`` (full name ``name``) as a :class:`ParamTarget`,
    or why it cannot be one."""
    if not owner_name:
        return "a parameter of the model's root module cannot be adapted (no module to wrap)"
    if param_name == "base_layer":
        return "a parameter named 'base_layer' clashes with the wrapper's base_layer"
    param = getattr(owner, param_name)
    shape = tuple(param.shape)
    if param.dim() not in SUPPORTED_NDIM:
        return (
            f"a {param.dim()}-D parameter {shape}; target_parameters adapts 2-D "
            "(d_out, d_in) and 3-D expert (E, d_out, d_in) parameters"
        )
    if not param.is_floating_point():
        return f"a {param.dtype} parameter; only floating-point parameters can be adapted"
    transposed = param.dim() == 3 and bool(getattr(owner, "is_transposed", False))
    experts = shape[0] if param.dim() == 3 else None
    d_out, d_in = shape[-2:] if not transposed else shape[:-3:-1]
    base = BaseInfo(FLOAT, d_in, d_out, False, param.dtype, param.device)
    return ParamTarget(
        name,
        owner,
        d_in,
        d_out,
        False,
        base,
        owner_name=owner_name,
        param_name=param_name,
        experts=experts,
        transposed=transposed,
    )


def place_parameter(
    model: nn.Module, name: str, module: object, *, adapted: bool = False
) -> ParamTarget | str:
    """Parameter ``name`` of ``model`` as the target of an adapter file's parameter
    ``module`` (its ModuleConfig), or why it cannot be (no such parameter, already
    adapted without ``adapted``, or another shape, expert count or layout)."""
    owner_name, _, param_name = name.rpartition(".")
    try:
        host = model.get_submodule(owner_name)
    except AttributeError:
        return f"no module {owner_name!r} in {type(model).__name__}"
    owner = host.base_layer if isinstance(host, ParametersWrapper) else host
    if not isinstance(owner._parameters.get(param_name), nn.Parameter):
        return f"no parameter {param_name!r} in {owner_name} ({type(owner).__name__})"
    if isinstance(host._modules.get(param_name), ParamLoraLayer) and not adapted:
        return "already adapted"
    target = as_parameter_target(name, owner_name, owner, param_name)
    if isinstance(target, str):
        return target
    want = (module.experts, bool(module.transposed), module.d_out, module.d_in)
    have = (target.experts, target.transposed, target.d_out, target.d_in)
    if want != have:
        return f"model has (experts, transposed, d_out, d_in) = {have}, adapter {want}"
    return target


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _warn_uncovered(model: nn.Module, covered: set[str]) -> None:
    # "all-linear" keeps PEFT's meaning (linear layers only); fused expert weights are
    # parameters, which target_parameters selects.
    left = [c[0] for c in parameter_candidates(model) if c[0] not in covered]
    params = dict(model.named_parameters())
    fused = [n for n in left if n in params and params[n].dim() == 3]
    if not fused:
        return
    tails = sorted({".".join(n.split(".")[-2:]) for n in fused})
    warnings.warn(
        f'target_modules="all-linear" adapts linear layers only; {len(fused)} fused expert '
        f"parameter(s) ({', '.join(tails)}) are left out: add "
        f"target_parameters={tails!r} to adapt them",
        UserWarning,
        stacklevel=3,
    )


# --- the layers -------------------------------------------------------------------------


class ParamAdapterView(AdapterView):
    """One adapter of a :class:`ParamLoraLayer` (factors with a leading ``E`` for experts)."""

    __slots__ = ()

    @property
    def rank(self) -> int:
        return self.lora_B.shape[-1]

    @property
    def experts(self) -> int | None:
        return self.layer.experts

    def delta_weight(self) -> torch.Tensor:
        """``s * B_e @ A_e`` per expert in float32, laid out like the parameter."""
        delta = self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return delta.mT if self.layer.transposed else delta


class ParamLoraLayer(LoraLayer):
    """The adapters of one parameter of an owner module (see the module docstring).

    Not called by the model: :class:`ParametersWrapper` calls it (no arguments) for the
    weight the owner computes with, ``W + s * B @ A`` of the active adapter, or ``None``
    when ``W`` is to be used as it is (no active adapter here, merged, or disabled).
    The owner is referenced, not registered: the wrapper holds it once as
    ``base_layer``, so the state dict has the base parameter once.
    """

    def __init__(
        self,
        owner: nn.Module,
        param_name: str,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        *,
        experts: int | None,
        transposed: bool,
        scale: float,
        stream: int,
        train_A: bool,
        train_B: bool,
        a_regenerated: bool,
        adapter_name: str = DEFAULT_ADAPTER,
        a_identity: Hashable | None = None,
    ) -> None:
        nn.Module.__init__(self)  # LoraLayer.__init__ registers a base layer; this has none
        object.__setattr__(self, "_owner", owner)  # a plain reference, not a submodule
        self.param_name = param_name
        self.experts = experts
        self.transposed = transposed
        self.fan_in_fan_out = False
        self.tied_with = None
        shape = tuple(getattr(owner, param_name).shape[-2:])
        self._shape = shape[::-1] if not transposed else shape  # (d_in, d_out)
        self._start_adapters(
            adapter_name,
            lora_A,
            lora_B,
            scale=scale,
            stream=stream,
            train_A=train_A,
            train_B=train_B,
            a_regenerated=a_regenerated,
            a_identity=a_identity,
        )

    def adapter(self, name: str = DEFAULT_ADAPTER) -> ParamAdapterView:
        self._branch(name)
        return ParamAdapterView(self, name)

    def _default(self) -> ParamAdapterView:
        super()._default()  # raises when there is no "default" adapter
        return ParamAdapterView(self, DEFAULT_ADAPTER)

    def take_adapter(self, source: LoraLayer, name: str) -> None:
        if not isinstance(source, ParamLoraLayer):
            raise TypeError("a parameter's layer takes adapters of parameter layers only")
        super().take_adapter(source, name)

    @property
    def weight(self) -> torch.Tensor:
        """The base parameter (as stored in the owner)."""
        return getattr(self._owner, self.param_name)

    def forward(self) -> torch.Tensor | None:  # type: ignore[override]
        if self._route is not None:
            if isinstance(self._route, DisabledRoute):
                return None
            raise ValueError(refusal("per_sample_adapters"))
        name = self._active
        if name is None or self._merged is not None:
            return None
        view = self.adapter(name)
        return updated_weight(self.weight, view.lora_A, view.lora_B, view.scale, self.transposed)

    @torch.no_grad()
    @property
    def kind(self) -> str:
        """``"parameter"``: the adapter file's kind of an adapted parameter."""
        return PARAMETER_KIND

    @property
    def kernel(self) -> tuple[int, ...]:
        return ()

    def merge(self) -> None:
        """``W += s * B @ A`` of the active adapter, in float32 rounded once to W's dtype."""
        if self._merged is None and self._active is not None:
            _add_to_parameter(self.weight, self.adapter(self._active).delta_weight())
            self._merged = self._active

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W -= s * B @ A`` of the merged adapter; exact only as far as W's dtype allows."""
        if self._merged is not None:
            _add_to_parameter(self.weight, -self.adapter(self._merged).delta_weight())
            self._merged = None

    def extra_repr(self) -> str:
        shape = "" if self.experts is None else f"experts={self.experts}, "
        transposed = ", transposed" if self.transposed else ""
        return f"{self.param_name}: {shape}{super().extra_repr()}{transposed}"


def updated_weight(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool
) -> torch.Tensor:
    """``W + scale * B @ A`` (per expert; blocks transposed when ``transposed``), in W's
    dtype, as one (batched) GEMM: the only tensor of W's size it makes is the result."""
    a, b = a.to(w.dtype), b.to(w.dtype)
    lhs, rhs = (a.mT, b.mT) if transposed else (b, a)
    # autocast would round the GEMM to its dtype; the owner expects W's dtype (as PEFT).
    with torch.autocast(device_type=w.device.type, enabled=False):
        if w.dim() == 2:
            return torch.addmm(w, lhs, rhs, alpha=scale)
        return torch.baddbmm(w, lhs, rhs, alpha=scale)


def _add_to_parameter(param: torch.Tensor, delta: torch.Tensor) -> None:
    # The float rule of asymlora.nn.base.add_to_weight: add in float32, round once.
    param.copy_((param.float() + delta.to(param.device)).to(param.dtype))


class ParametersWrapper(nn.Module):
    """An owner module (``base_layer``) whose parameters are adapted: a
    :class:`ParamLoraLayer` under each adapted parameter's name.

    Forward calls the owner with the same arguments, its adapted parameters replaced for
    that call by their updated weights; other attributes are read from the owner.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def parameter_layers(self) -> list[tuple[str, ParamLoraLayer]]:
        return [(n, m) for n, m in self._modules.items() if isinstance(m, ParamLoraLayer)]

    def forward(self, *args: object, **kwargs: object) -> object:
        overrides = {}
        for name, layer in self.parameter_layers():
            weight = layer()
            if weight is not None:
                overrides[name] = weight
        if not overrides:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, overrides, tuple(args), kwargs)

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            # the model's code may read attributes of the module it built (num_experts, ...)
            return getattr(self.base_layer, name)


# --- putting layers into a model and taking them out ------------------------------------


def install_parameter_layer(model: nn.Module, name: str, layer: ParamLoraLayer) -> None:
    """Puts ``layer`` (for parameter ``name``) into ``model``: the owner is wrapped in a
    :class:`ParametersWrapper` if it is not yet; a parameter already adapted takes the
    layer's adapter as one more."""
    owner_name, _, param_name = name.rpartition(".")
    host = model.get_submodule(owner_name)
    if not isinstance(host, ParametersWrapper):
        host = ParametersWrapper(host)
        replace_module(model, owner_name, host)
    current = host._modules.get(param_name)
    if isinstance(current, ParamLoraLayer):
        current.take_adapter(layer, layer.adapter_names[0])
    else:
        host._modules[param_name] = layer  # add_module would see the owner's parameter


def remove_layer(model: nn.Module, name: str, layer: LoraLayer) -> None:
    """Takes adapted layer ``name`` out of ``model``: a module's layer is replaced by its
    base layer; a parameter's layer leaves its wrapper, and the last one to leave puts
    the plain owner back."""
    if not isinstance(layer, ParamLoraLayer):
        replace_module(model, name, layer.base_layer)
        return
    owner_name, _, param_name = name.rpartition(".")
    host = model.get_submodule(owner_name)
    delattr(host, param_name)
    if not host.parameter_layers():
        replace_module(model, owner_name, host.base_layer)


def check_no_parameter_layers(model: nn.Module, what: str) -> None:
    """Raises ``ValueError`` when ``model`` has adapted parameters (``what`` cannot
    handle them)."""
    if any(isinstance(layer, ParamLoraLayer) for _, layer in lora_layers(model)):
        raise ValueError(refusal(what))


def refusal(what: str) -> str:
    return (
        f"{what} cannot route batch rows through adapted parameters (target_parameters): "
        "their update is added to the weight the whole batch uses (PEFT refuses mixed "
        "batches there too); run one adapter per batch with asymlora.set_adapter"
    )


def is_parameter_module(module: object) -> bool:
    """Whether an adapter file's module (its ModuleConfig) is an adapted parameter."""
    # getattr: a ModuleConfig from before issue 15's kind field is a linear module
    return getattr(module, "kind", "linear") == PARAMETER_KIND


def file_fields(layer: LoraLayer) -> dict[str, object]:
    """The adapter-file module fields of ``layer`` besides the linear ones: ``kind``,
    ``experts`` and ``transposed`` of a parameter (omitted when default)."""
    if not isinstance(layer, ParamLoraLayer):
        return {}
    fields: dict[str, object] = {"kind": PARAMETER_KIND}
    if layer.experts is not None:
        fields["experts"] = layer.experts
    if layer.transposed:
        fields["transposed"] = True
    return fields


def stack_experts(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``E`` expert blocks of one factor as one ``(E, ...)`` tensor."""
    return torch.stack(list(blocks))
