"""The computational-limits paper's diagnostic: max-entry norms of the attention inputs.

Almost-linear algorithms for LoRA gradients exist only while the entries of the
query and key projections of a batch, ``X (W_Q + s B_Q A_Q)`` and ``X W_K``, stay
below a threshold of order ``sqrt(log L)`` (L = sequence length). :func:`norm_report`
measures those max-entry norms with and without the adapter in one forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from asymlora.nn.layer import LoraLayer

#: (query suffix, key suffix) pairs of common architectures; GPT-2's fused c_attn is special
QUERY_KEY_NAMES = (("q_proj", "k_proj"), ("query", "key"), ("q", "k"), ("q_lin", "k_lin"))
FUSED_QKV_NAMES = ("c_attn",)


@dataclass(frozen=True)
class NormRow:
    """Max-entry norms of one attention layer's Q and K for the batch."""

    layer: str
    q_base: float
    q_adapted: float
    k_base: float
    k_adapted: float

    @property
    def largest(self) -> float:
        return max(self.q_adapted, self.k_adapted)


@dataclass(frozen=True)
class NormReport:
    """Per attention layer, ``||X W||_max`` of Q and K without and with the adapter."""

    rows: list[NormRow]
    seq_len: int

    @property
    def threshold(self) -> float:
        """``sqrt(log L)``, the scale of the efficiency threshold (natural log)."""
        return math.sqrt(math.log(self.seq_len)) if self.seq_len > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "sqrt_log_L": self.threshold,
            "rows": [asdict(r) for r in self.rows],
        }

    def __str__(self) -> str:
        head = (
            f"{'layer':<36} {'|Q|max base':>12} {'|Q|max adapted':>15} "
            f"{'|K|max base':>12} {'|K|max adapted':>15} {'max/sqrt(log L)':>16}"
        )
        lines = [f"L = {self.seq_len}, sqrt(log L) = {self.threshold:.4f}", head]
        for r in self.rows:
            ratio = r.largest / self.threshold if self.threshold else math.inf
            lines.append(
                f"{r.layer:<36} {r.q_base:>12.4g} {r.q_adapted:>15.4g} "
                f"{r.k_base:>12.4g} {r.k_adapted:>15.4g} {ratio:>16.3g}"
            )
        return "\n".join(lines)


def norm_report(model: nn.Module, inputs: Mapping[str, Any] | torch.Tensor) -> NormReport:
    """Runs one forward pass (no grad, eval mode) and reports Q/K max-entry norms per layer.

    ``inputs`` is a tensor of input ids or a mapping of keyword arguments for the model
    (e.g. a tokenizer's output). Query/key projections are found by name (``q_proj``/
    ``k_proj``, ``query``/``key``, ``q``/``k``, GPT-2's fused ``c_attn``); a projection
    without an adapter has equal "base" and "adapted" norms.

    Raises:
        ValueError: no query/key projections found, or adapters are merged (the base
            projection is then not observable; call ``asymlora.unmerge_adapter`` first).
    """
    pairs = _query_key_modules(model)
    if not pairs:
        raise ValueError(
            f"no query/key projections found in {type(model).__name__} "
            f"(looked for {QUERY_KEY_NAMES} and fused {FUSED_QKV_NAMES})"
        )
    observed: dict[int, Any] = {}
    seq_len = [0]
    modules = {id(m): (m, q is k) for q, k in pairs.values() for m in (q, k)}
    handles = [_observe(m, fused, observed, seq_len) for m, fused in modules.values()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(inputs, torch.Tensor):
                model(inputs)
            else:
                model(**inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    rows = [_row(layer, q, k, observed) for layer, (q, k) in pairs.items()]
    return NormReport(rows=rows, seq_len=seq_len[0])


def _query_key_modules(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    modules = dict(model.named_modules())
    pairs: dict[str, tuple[nn.Module, nn.Module]] = {}
    for name, module in modules.items():
        parent, _, leaf = name.rpartition(".")
        if leaf in FUSED_QKV_NAMES:
            pairs[parent] = (module, module)
        for q_name, k_name in QUERY_KEY_NAMES:
            key = f"{parent}.{k_name}" if parent else k_name
            if leaf == q_name and key in modules:
                pairs[parent] = (module, modules[key])
    return pairs


def _observe(
    module: nn.Module, fused: bool, observed: dict[int, Any], seq_len: list[int]
) -> torch.utils.hooks.RemovableHandle:
    def hook(mod: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        x = args[0]
        seq_len[0] = x.shape[-2] if x.dim() >= 2 else 1
        if isinstance(mod, LoraLayer):
            if mod.merged:
                raise ValueError("adapters are merged; call asymlora.unmerge_adapter(model) first")
            base = mod.base_layer(x)
        else:
            base = output
        observed[id(mod)] = (_max_entry(base, fused), _max_entry(output, fused))

    return module.register_forward_hook(hook)


def _max_entry(y: torch.Tensor, fused: bool) -> Any:
    if fused:  # GPT-2's c_attn output is [Q | K | V] along the last dimension
        q, k, _ = y.float().abs().split(y.shape[-1] // 3, dim=-1)
        return (q.max().item(), k.max().item())
    return y.float().abs().max().item()


def _row(layer: str, q: nn.Module, k: nn.Module, observed: dict[int, Any]) -> NormRow:
    q_base, q_adapted = observed[id(q)]
    k_base, k_adapted = observed[id(k)]
    if q is k:  # fused projection: each observation is a (Q, K) pair
        return NormRow(layer, q_base[0], q_adapted[0], k_base[1], k_adapted[1])
    return NormRow(layer, q_base, q_adapted, k_base, k_adapted)
