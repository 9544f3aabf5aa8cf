"""The adapted layer: ``y = base(x) + s * (dropout(x) A^T) B^T``, for one or several adapters.

For an embedding ``x A^T`` is the lookup of the token ids in ``A^T`` (num_embeddings x r);
for a convolution it is the convolution of ``x`` with ``A`` unflattened to r kernels of
the base's shape, stride, padding and dilation, and ``B`` acts as a 1x1 convolution.

A :class:`LoraLayer` holds one or more named adapters (branches) around one frozen base
layer. The adapter named :data:`DEFAULT_ADAPTER` keeps its factors on the layer itself
(``lora_A``, ``lora_B``: the state-dict keys of a one-adapter model); any other adapter
``name`` keeps them in ``lora_adapters.<name>``. Adapters whose frozen ``A`` is the same
generator output (same generator, seed, stream, rank, d_in, dtype and gain: the
:attr:`AdapterView.a_identity`) share one buffer: only their ``B`` take memory.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from asymlora.nn.base import CONV, EMBEDDING, add_to_weight, weight_layout
from asymlora.nn.base import info as base_info

#: the names of an adapted layer's two factors, as in its state dict
FACTOR_NAMES = ("lora_A", "lora_B")
#: the adapter of a model wrapped or loaded without a name (PEFT's default name too)
DEFAULT_ADAPTER = "default"
#: child module holding the factors of the adapters not named ``"default"``
ADAPTERS_MODULE = "lora_adapters"

#: what every adapted layer of a model calls instead of its own branch while a context
#: (``disable_adapters``, ``per_sample_adapters``) is active: ``route(layer, x, y)``
Route = Callable[["LoraLayer", torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _Branch:
    """What one adapter is in one layer, apart from its tensors."""

    scale: float
    stream: int
    a_regenerated: bool
    #: key of a regenerated ``A`` (adapters with equal keys share one buffer), else None
    a_identity: Hashable | None
    #: the adapter whose holder registers this adapter's ``A`` (itself unless shared)
    a_owner: str


class _Holder(nn.Module):
    """The factors (and dropout) of one adapter not named ``"default"``."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout: nn.Module = nn.Identity()


class LoraLayer(nn.Module):
    """A frozen ``nn.Linear`` or transformers ``Conv1D`` (float, or quantised by
    bitsandbytes or torchao: :mod:`asymlora.nn.base`), ``nn.Embedding`` or
    ``nn.Conv1d/2d/3d`` plus rank-``r`` adapters.

    ``A`` (r x d_in) and ``B`` (d_out x r) are parameters when trained and buffers
    when frozen, so an optimizer never sees a frozen factor. A frozen ``A`` that the
    generator can rebuild from (seed, ``stream``) is a non-persistent buffer: state
    dicts and adapter files do not carry it.

    The product ``B @ A`` (d_out x d_in) is never formed in training: the branch is
    two thin matmuls, and with ``A`` frozen autograd keeps only ``x A^T`` (N x r) for
    backward, not ``x`` (N x d_in).

    Forward adds the branch of the layer's active adapter only (none when the layer
    does not hold the model's active adapter). ``lora_A``, ``lora_B``, :attr:`scale`,
    :attr:`stream`, :attr:`rank` and :attr:`a_regenerated` are those of the adapter
    named ``"default"``; :meth:`adapter` gives any adapter's.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        *,
        scale: float,
        stream: int,
        train_A: bool,
        train_B: bool,
        a_regenerated: bool,
        dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        adapter_name: str = DEFAULT_ADAPTER,
        a_identity: Hashable | None = None,
        tied_with: str | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        #: True for GPT-2's ``Conv1D``, whose weight is stored d_in x d_out
        self.fan_in_fan_out = fan_in_fan_out
        base = base_info(base_layer)  # the weight of a quantised layer is packed
        self._base = base
        self._shape = (base.d_in, base.d_out)
        #: the module that shares this layer's weight (a tied output head), or None
        self.tied_with = tied_with
        # Gemma-style embeddings multiply their rows by embed_scale in forward; the
        # branch is scaled alike (as PEFT does), so merging W + delta stays equal.
        self._embed_scale = _embed_scale(base_layer) if base.layer == EMBEDDING else 1.0
        self._start_adapters(
            adapter_name,
            lora_A,
            lora_B,
            scale=scale,
            stream=stream,
            train_A=train_A,
            train_B=train_B,
            a_regenerated=a_regenerated,
            dropout=dropout,
            a_identity=a_identity,
        )

    def _start_adapters(
        self, adapter_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, **adapter: Any
    ) -> None:
        """The adapter state of a new layer (subclasses too), with its first adapter,
        active: ``adapter`` are :meth:`add_adapter`'s keyword arguments."""
        self.dropout: nn.Module = nn.Identity()
        self._branches: dict[str, _Branch] = {}
        self._active: str | None = None
        self._merged: str | None = None
        self._route: Route | None = None
        self.add_adapter(adapter_name, lora_A, lora_B, **adapter)
        self._active = adapter_name

    # --- the adapters ---------------------------------------------------------------------

    def add_adapter(
        self,
        name: str,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        *,
        scale: float,
        stream: int,
        train_A: bool,
        train_B: bool,
        a_regenerated: bool,
        dropout: float = 0.0,
        a_identity: Hashable | None = None,
    ) -> None:
        """Adds adapter ``name`` (not made active). With an ``a_identity`` equal to that
        of an adapter already here, ``lora_A`` is not kept: the two share that ``A``."""
        check_adapter_name(name)
        if name in self._branches:
            raise ValueError(f"this layer already holds an adapter named {name!r}")
        holder = self._new_holder(name)
        shared = None
        if a_identity is not None and a_regenerated and not train_A:
            shared = next(
                (b.a_owner for b in self._branches.values() if b.a_identity == a_identity), None
            )
        if shared is None:
            _register(holder, "lora_A", lora_A, trainable=train_A, persistent=not a_regenerated)
        _register(holder, "lora_B", lora_B, trainable=train_B, persistent=True)
        # an embedding's input is token ids: dropout does not apply to it (as in PEFT)
        dropped = dropout > 0 and self.kind != EMBEDDING
        holder.dropout = nn.Dropout(dropout) if dropped else nn.Identity()
        identity = a_identity if a_regenerated and not train_A else None
        self._branches[name] = _Branch(
            float(scale), int(stream), bool(a_regenerated), identity, shared or name
        )
        if shared is not None and name == DEFAULT_ADAPTER:
            self._move_a(shared, DEFAULT_ADAPTER)

    def take_adapter(self, source: LoraLayer, name: str) -> None:
        """Moves adapter ``name`` of ``source`` (a layer around the same base) here."""
        view = source.adapter(name)
        trained = view.trained_factors()
        self.add_adapter(
            name,
            view.lora_A,
            view.lora_B,
            scale=view.scale,
            stream=view.stream,
            train_A="A" in trained,
            train_B="B" in trained,
            a_regenerated=view.a_regenerated,
            dropout=_dropout_p(view.dropout),
            a_identity=view.a_identity,
        )

    def remove_adapter(self, name: str) -> None:
        """Drops adapter ``name`` (its ``A`` stays while another adapter shares it)."""
        self._branch(name)
        if self._merged == name:
            raise ValueError(f"adapter {name!r} is merged; unmerge it first")
        sharers = [n for n, b in self._branches.items() if b.a_owner == name and n != name]
        if sharers:
            self._move_a(name, DEFAULT_ADAPTER if DEFAULT_ADAPTER in sharers else sharers[0])
        del self._branches[name]
        if name == DEFAULT_ADAPTER:
            for factor in FACTOR_NAMES:
                if factor in self._parameters or factor in self._buffers:
                    delattr(self, factor)
            self.dropout = nn.Identity()
        else:
            del self.lora_adapters[name]
            if not len(self.lora_adapters):
                del self.lora_adapters
        if self._active == name:
            self._active = None

    def _move_a(self, owner: str, new_owner: str) -> None:
        # Re-registers a shared (non-persistent, frozen) A under another sharer.
        if owner == new_owner:
            return
        old = self._holder(owner)
        a = old._buffers.pop("lora_A")
        old._non_persistent_buffers_set.discard("lora_A")
        self._holder(new_owner).register_buffer("lora_A", a, persistent=False)
        for branch in self._branches.values():
            if branch.a_owner == owner:
                branch.a_owner = new_owner

    def _new_holder(self, name: str) -> nn.Module:
        if name == DEFAULT_ADAPTER:
            return self
        if ADAPTERS_MODULE not in self._modules:
            self.lora_adapters = nn.ModuleDict()
        self.lora_adapters[name] = _Holder()
        return self.lora_adapters[name]

    def _holder(self, name: str) -> nn.Module:
        return self if name == DEFAULT_ADAPTER else self.lora_adapters[name]

    def _branch(self, name: str) -> _Branch:
        branch = self._branches.get(name)
        if branch is None:
            raise KeyError(f"this layer holds no adapter {name!r} (it holds {self.adapter_names})")
        return branch

    @property
    def adapter_names(self) -> list[str]:
        """The names of the adapters this layer holds, in the order they were added."""
        return list(self._branches)

    def has_adapter(self, name: str) -> bool:
        return name in self._branches

    def adapter(self, name: str = DEFAULT_ADAPTER) -> AdapterView:
        """Adapter ``name`` of this layer: its factors, scale, stream (a live view)."""
        self._branch(name)
        return AdapterView(self, name)

    @property
    def active_adapter(self) -> str | None:
        """The adapter forward adds, or ``None`` (this layer lacks the model's active one)."""
        return self._active

    def set_active(self, name: str | None) -> None:
        """Makes ``name`` the adapter forward adds (``None`` or one not held: none)."""
        self._active = name if name in self._branches else None

    @property
    def route(self) -> Route | None:
        """The route forward follows instead of the active adapter (see :meth:`set_route`)."""
        return self._route

    def set_route(self, route: Route | None) -> Route | None:
        """Lets ``route(self, x, y)`` compute forward's result from the base output ``y``
        (``None``: the active adapter again); returns the route it replaces."""
        previous, self._route = self._route, route
        return previous

    # --- what a one-adapter model always had ------------------------------------------------

    @property
    def rank(self) -> int:
        return self._default().rank

    @property
    def scale(self) -> float:
        return self._default().scale

    @property
    def stream(self) -> int:
        return self._default().stream

    @property
    def a_regenerated(self) -> bool:
        """True when ``A`` is the generator's output for (seed, stream), never trained."""
        return self._default().a_regenerated

    def _default(self) -> AdapterView:
        if DEFAULT_ADAPTER not in self._branches:
            # AttributeError: hasattr() and getattr(..., default) keep working
            raise AttributeError(
                f"this layer holds no adapter named 'default' (it holds "
                f"{self.adapter_names}); use layer.adapter(name)"
            )
        return AdapterView(self, DEFAULT_ADAPTER)

    @property
    def kind(self) -> str:
        """The layer kind: ``"linear"``, ``"embedding"`` or ``"conv"``."""
        return self._base.layer

    @property
    def kernel(self) -> tuple[int, ...]:
        """A convolution's kernel size (empty for the other kinds)."""
        return self._base.kernel

    @property
    def output_scale(self) -> float:
        """What the base multiplies its output by besides ``W`` (an embedding's
        ``embed_scale``, else 1): every branch is scaled alike."""
        return self._embed_scale

    @property
    def d_in(self) -> int:
        return self._shape[0]

    @property
    def d_out(self) -> int:
        return self._shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (some model code reads ``module.weight`` directly)."""
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        """True while an adapter is merged into the base weight."""
        return self._merged is not None

    @property
    def merged_adapter(self) -> str | None:
        return self._merged

    def frozen_factors(self) -> list[tuple[str, torch.Tensor]]:
        """``(state name, tensor)`` of every factor kept as a buffer (not trained), each
        shared ``A`` once; for a one-adapter layer ``lora_A`` first, then ``lora_B``."""
        found = []
        for name in self._branches:
            holder, prefix = self._holder(name), _prefix(name)
            found += [(prefix + n, b) for n, b in holder._buffers.items() if n in FACTOR_NAMES]
        return found

    def trained_factors(self) -> str:
        """Which factors of adapter ``"default"`` are parameters: ``"A"``, ``"B"``, ``"AB"``
        or ``"none"``."""
        return self._default().trained_factors()

    # --- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self._route is not None:
            return self._route(self, x, y)
        name = self._active
        if name is None or self._merged is not None:
            return y
        branch = self._branches[name]
        holder = self._holder(name)
        a = self._holder(branch.a_owner).lora_A
        return self.add_branch(y, holder.dropout(x), a, holder.lora_B, branch.scale)

    def project(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``x A^T`` with the rank last: (..., r) for a linear or embedding, (N, *spatial, r)
        for a convolution."""
        if self.kind == EMBEDDING:
            e = self.base_layer
            # F.embedding's own gradient rules (padding_idx, scale_grad_by_freq) apply to A
            return F.embedding(
                x,
                _like(a, e.weight).t(),
                e.padding_idx,
                None,
                e.norm_type,
                e.scale_grad_by_freq,
                e.sparse,
            )
        if self.kind == CONV:
            c_in = self.d_in // math.prod(self.kernel)
            kernels = _like(a, x).reshape(a.shape[0], c_in, *self.kernel)
            if kernels.requires_grad:  # A trained: torch's conv keeps x for A's gradient
                h = self.base_layer._conv_forward(x, kernels, None)
            else:
                h = _frozen_conv(self.base_layer, x, kernels)
            return h.movedim(self._channel(x), -1)
        return F.linear(x, _like(a, x))

    def to_output(self, delta: torch.Tensor) -> torch.Tensor:
        """A delta with the features last (:meth:`project` @ ``B^T``) in the output's layout."""
        return delta.movedim(-1, self._channel(delta)) if self.kind == CONV else delta

    def _channel(self, t: torch.Tensor) -> int:
        # the channel dimension of a convolution's input or output: 1, or 0 unbatched
        return t.dim() - len(self.kernel) - 1

    def add_branch(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``y + scale * (x A^T) B^T``, in place into ``y`` where that is safe."""
        h = self.project(x, a)
        b = _like(b, h)
        scale = scale * self._embed_scale
        if self.kind == CONV:
            delta = self.to_output(h @ b.t())
            if self.may_add_in_place(y, delta):
                return y.add_(delta, alpha=scale)
            return y + scale * delta
        y2d, h2d = y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1])
        if self.may_add_in_place(y, b):
            # The base output is a fresh tensor autograd does not keep: adding the branch
            # into it in place saves one N x d_out activation per layer (about 136 MiB
            # of peak RSS in benches/bench_train.py).
            return y2d.addmm_(h2d, b.t(), alpha=scale).view(y.shape)
        # addmm still folds the scale and the add into the GEMM.
        return torch.addmm(y2d, h2d, b.t(), alpha=scale).view(y.shape)

    def may_add_in_place(self, y: torch.Tensor, delta: torch.Tensor) -> bool:
        """Whether the base output ``y`` may be changed in place by a ``delta`` of that dtype."""
        # A hook on the base layer may hold on to its output; never change it then.
        # An in-place add cannot change y's dtype, so the branch must already be in it.
        base = self.base_layer
        return not (base._forward_hooks or base._forward_pre_hooks) and y.dtype == delta.dtype

    # --- merging ---------------------------------------------------------------------------

    def delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """``s * B @ A`` of an adapter (default: the active one, else ``"default"``) in
        float32, laid out like the base weight."""
        return self.adapter(adapter_name or self._active or DEFAULT_ADAPTER).delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """``W += s * B @ A`` of the active adapter, in float32 rounded once to W's dtype
        (nothing when the layer does not hold the active adapter). A quantised base is
        dequantised, added to and quantised again, or refused
        (:func:`asymlora.nn.base.add_to_weight`)."""
        if self._merged is None and self._active is not None:
            self._check_untied("merge")
            add_to_weight(self.base_layer, self.adapter(self._active).delta_weight())
            self._merged = self._active

    def _check_untied(self, what: str) -> None:
        if self.tied_with is not None:
            raise ValueError(
                f"cannot {what} into this {type(self.base_layer).__name__}: its weight is tied "
                f"to {self.tied_with}, which would change too; the adapter changes the input "
                "embeddings only (untie the weights first: model.config.tie_word_embeddings)"
            )

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W -= s * B @ A`` of the merged adapter; exact only as far as W's dtype allows."""
        if self._merged is not None:
            delta = -self.adapter(self._merged).delta_weight()
            add_to_weight(self.base_layer, delta, what="unmerge")
            self._merged = None

    def extra_repr(self) -> str:
        if list(self._branches) == [DEFAULT_ADAPTER]:
            return (
                f"rank={self.rank}, scale={self.scale:g}, stream={self.stream}, "
                f"train={self.trained_factors()}, merged={self.merged}"
            )
        return f"adapters={self.adapter_names}, active={self._active}, merged={self._merged}"


class AdapterView:
    """One adapter of one :class:`LoraLayer`: its factors as the layer holds them now."""

    __slots__ = ("layer", "name")

    def __init__(self, layer: LoraLayer, name: str) -> None:
        self.layer = layer
        self.name = name

    @property
    def _info(self) -> _Branch:
        return self.layer._branch(self.name)

    @property
    def lora_A(self) -> torch.Tensor:
        return self.layer._holder(self._info.a_owner).lora_A

    @property
    def lora_B(self) -> torch.Tensor:
        return self.layer._holder(self.name).lora_B

    @property
    def dropout(self) -> nn.Module:
        return self.layer._holder(self.name).dropout

    @property
    def scale(self) -> float:
        return self._info.scale

    @property
    def stream(self) -> int:
        return self._info.stream

    @property
    def a_regenerated(self) -> bool:
        return self._info.a_regenerated

    @property
    def a_identity(self) -> Hashable | None:
        """Key of a regenerated, frozen ``A``: adapters of a layer with equal keys share it."""
        return self._info.a_identity

    @property
    def a_owner(self) -> str:
        """The adapter of the layer that keeps this adapter's ``A`` (itself, unless shared)."""
        return self._info.a_owner

    @property
    def a_shared(self) -> bool:
        """True when another adapter of the layer uses the same ``A`` tensor."""
        owner = self._info.a_owner
        return sum(b.a_owner == owner for b in self.layer._branches.values()) > 1

    @property
    def rank(self) -> int:
        return self.lora_B.shape[1]

    @property
    def d_in(self) -> int:
        return self.layer.d_in

    @property
    def d_out(self) -> int:
        return self.layer.d_out

    @property
    def fan_in_fan_out(self) -> bool:
        return self.layer.fan_in_fan_out

    def factors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``("lora_A", A), ("lora_B", B)``."""
        yield "lora_A", self.lora_A
        yield "lora_B", self.lora_B

    def trained_factors(self) -> str:
        """Which factors are parameters: ``"A"``, ``"B"``, ``"AB"`` or ``"none"``."""
        found = "".join(f[-1] for f, t in self.factors() if isinstance(t, nn.Parameter))
        return found or "none"

    def frozen_factors(self) -> list[tuple[str, torch.Tensor]]:
        """``(factor name, tensor)`` of the factors kept as buffers, ``A`` first."""
        return [(f, t) for f, t in self.factors() if not isinstance(t, nn.Parameter)]

    def requires_grad(self) -> bool:
        return any(t.requires_grad for _, t in self.factors())

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` in float32, laid out like the base weight."""
        delta = self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return weight_layout(self.layer._base, delta)

    @property
    def kind(self) -> str:
        return self.layer.kind

    def __repr__(self) -> str:
        return (
            f"AdapterView({self.name!r}, rank={self.rank}, scale={self.scale:g}, "
            f"stream={self.stream}, train={self.trained_factors()}, shared_A={self.a_shared})"
        )


def check_adapter_name(name: object) -> str:
    """``name`` when it can name an adapter (a module name), else ``ValueError``."""
    if not isinstance(name, str):
        raise TypeError(f"adapter_name must be a str, got {type(name).__name__}")
    if not name or "." in name or (name != DEFAULT_ADAPTER and hasattr(_RESERVED, name)):
        raise ValueError(
            f"adapter_name {name!r} cannot name a module (empty, a '.' or a reserved word)"
        )
    return name


_RESERVED = nn.ModuleDict()


def _register(
    module: nn.Module, name: str, value: torch.Tensor, *, trainable: bool, persistent: bool
) -> None:
    if trainable:
        param = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
        module.register_parameter(name, param)
    else:
        module.register_buffer(name, value, persistent=persistent)


def _prefix(name: str) -> str:
    return "" if name == DEFAULT_ADAPTER else f"{ADAPTERS_MODULE}.{name}."


def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _frozen_conv(conv: nn.Module, x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    # The base's convolution (padding mode, stride, padding, dilation) with A's kernels.
    # With A frozen only the input's gradient is needed, which depends on A alone; torch's
    # convolution would keep x (N x c_in x ...) for backward anyway, this keeps nothing.
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    return _FrozenConv.apply(x, kernels, conv.stride, padding, conv.dilation)


class _FrozenConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernels, stride, padding, dilation):  # type: ignore[override]
        dims = kernels.dim() - 2
        ctx.kernels, ctx.geometry, ctx.input_shape = kernels, (stride, padding, dilation), x.shape
        return _CONV_FNS[dims](x, kernels, None, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        kernels = ctx.kernels
        stride, padding, dilation = ctx.geometry
        unbatched = grad.dim() == kernels.dim() - 1
        if unbatched:
            grad = grad.unsqueeze(0)
        shape = (1, *ctx.input_shape) if unbatched else ctx.input_shape
        grad_x = _CONV_INPUT_GRADS[kernels.dim() - 2](
            shape, kernels, grad, stride, padding, dilation
        )
        return (grad_x[0] if unbatched else grad_x), None, None, None, None


_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT_GRADS = {
    1: torch.nn.grad.conv1d_input,
    2: torch.nn.grad.conv2d_input,
    3: torch.nn.grad.conv3d_input,
}


def _embed_scale(embedding: nn.Module) -> float:
    scale = getattr(embedding, "embed_scale", None)
    if scale is None:
        return 1.0
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        raise ValueError(f"embed_scale of {type(embedding).__name__} is not a scalar")
    return float(scale)


def _like(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Trained factors of a bf16/f16 model are float32 master weights; compute in x's dtype.
    return factor if factor.dtype == x.dtype else factor.to(x.dtype)
