"""The adapted layer: ``y = base(x) + s * (dropout(x) A^T) B^T``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: the names of an adapted layer's two factors, as in its state dict
FACTOR_NAMES = ("lora_A", "lora_B")


class LoraLayer(nn.Module):
    """A frozen ``nn.Linear`` or transformers ``Conv1D`` plus a rank-``r`` adapter.

    ``A`` (r x d_in) and ``B`` (d_out x r) are parameters when trained and buffers
    when frozen, so an optimizer never sees a frozen factor. A frozen ``A`` that the
    generator can rebuild from (seed, ``stream``) is a non-persistent buffer: state
    dicts and adapter files do not carry it.

    The product ``B @ A`` (d_out x d_in) is never formed in training: the branch is
    two thin matmuls, and with ``A`` frozen autograd keeps only ``x A^T`` (N x r) for
    backward, not ``x`` (N x d_in).
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
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scale = float(scale)
        self.stream = int(stream)
        #: True when ``A`` is the generator's output for (seed, stream), never trained
        self.a_regenerated = a_regenerated
        #: True for GPT-2's ``Conv1D``, whose weight is stored d_in x d_out
        self.fan_in_fan_out = fan_in_fan_out
        self.merged = False
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        _register(self, "lora_A", lora_A, trainable=train_A, persistent=not a_regenerated)
        _register(self, "lora_B", lora_B, trainable=train_B, persistent=True)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def d_in(self) -> int:
        return self.lora_A.shape[1]

    @property
    def d_out(self) -> int:
        return self.lora_B.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (some model code reads ``module.weight`` directly)."""
        return self.base_layer.weight

    def frozen_factors(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of the factors kept as buffers (not trained), ``A`` first."""
        return [(n, b) for n, b in self.named_buffers(recurse=False) if n in FACTOR_NAMES]

    def trained_factors(self) -> str:
        """Which factors are parameters: ``"A"``, ``"B"``, ``"AB"`` or ``"none"``."""
        return "".join(f for f in ("A", "B") if f"lora_{f}" in self._parameters) or "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = F.linear(self.dropout(x), _like(self.lora_A, x))
        b = _like(self.lora_B, h)
        y2d, h2d = y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1])
        if self._may_add_in_place(y, b):
            # The base output is a fresh tensor autograd does not keep: adding the branch
            # into it in place saves one N x d_out activation per layer (about 136 MiB
            # of peak RSS in benches/bench_train.py).
            return y2d.addmm_(h2d, b.t(), alpha=self.scale).view(y.shape)
        # addmm still folds the scale and the add into the GEMM.
        return torch.addmm(y2d, h2d, b.t(), alpha=self.scale).view(y.shape)

    def _may_add_in_place(self, y: torch.Tensor, b: torch.Tensor) -> bool:
        # A hook on the base layer may hold on to its output; never change it then.
        # addmm_ cannot change y's dtype, so the branch must already be in it.
        base = self.base_layer
        return not (base._forward_hooks or base._forward_pre_hooks) and y.dtype == b.dtype

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` in float32, laid out like the base weight."""
        delta = self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """``W += s * B @ A``, computed in float32 and rounded once to W's dtype."""
        if not self.merged:
            self._add_to_weight(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W -= s * B @ A``; exact only as far as W's dtype can represent it."""
        if self.merged:
            self._add_to_weight(-self.delta_weight())
            self.merged = False

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, scale={self.scale:g}, stream={self.stream}, "
            f"train={self.trained_factors()}, merged={self.merged}"
        )


def _register(
    module: nn.Module, name: str, value: torch.Tensor, *, trainable: bool, persistent: bool
) -> None:
    if trainable:
        module.register_parameter(name, nn.Parameter(value))
    else:
        module.register_buffer(name, value, persistent=persistent)


def _like(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Trained factors of a bf16/f16 model are float32 master weights; compute in x's dtype.
    return factor if factor.dtype == x.dtype else factor.to(x.dtype)
