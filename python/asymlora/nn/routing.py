"""Routes: what every adapted layer computes while a model-wide context is active.

- :class:`DisabledRoute` (``disable_adapters``): the base layer's output alone;
- :class:`PerSampleRoute` (``per_sample_adapters``): row ``i`` of the batch gets the
  branch of adapter ``names[i]`` (``None``: none). Per layer, ``x A^T`` is computed once
  per distinct ``A`` (adapters sharing a regenerated ``A`` share this product, so a batch
  of adapters from one seed computes it once for the whole batch), then each row's
  ``s B^T`` is applied to its own rows: the scaled ``B^T`` of the layer's adapters are
  stacked once per context, gathered per row and applied by one batched matmul
  (``"gather"``), or applied adapter by adapter to their rows with ``index_add_``
  (``"grouped"``). Rows are never copied per adapter; ``x`` is copied (rows of one
  ``A`` gathered) only when a layer sees more than one distinct ``A``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from asymlora.nn.base import CONV
from asymlora.nn.layer import LoraLayer

#: how a mixed batch applies its B factors: "gather" (one bmm over per-row B) or
#: "grouped" (one matmul and index_add_ per adapter)
ALGORITHMS = ("gather", "grouped")


class DisabledRoute:
    """Every adapted layer gives its base layer's output (``disable_adapters``)."""

    def __call__(self, layer: LoraLayer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y


class PerSampleRoute:
    """Row ``i`` of every batch goes through adapter ``names[i]`` (``None``: the base).

    Plans (stacked ``B``, row indices) are built per layer, device and dtype on first
    use and kept for the route's lifetime: the factors are read once per context.
    """

    def __init__(self, names: Sequence[str | None], algorithm: str = "gather") -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self.names = tuple(names)
        self.algorithm = algorithm
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            if name is not None:
                rows.setdefault(name, []).append(i)
        #: adapter name -> its rows, in order of first appearance
        self.rows = rows
        self._plans: dict[tuple[int, torch.device, torch.dtype], _LayerPlan] = {}

    def __call__(self, layer: LoraLayer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[0] != len(self.names):
            rows = x.shape[0] if x.dim() >= 2 else "no"
            raise ValueError(
                f"per_sample_adapters: names has {len(self.names)} entries but an adapted "
                f"layer got a batch of {rows} rows; give one name per row of the batch the "
                "layers see (model.generate with num_beams or num_return_sequences k > 1 "
                "expands each row k times: repeat each name k times)"
            )
        key = (id(layer), x.device, x.dtype)
        plan = self._plans.get(key)
        if plan is None or plan.layer is not layer:
            plan = _LayerPlan.build(layer, self.rows, len(self.names), x, self.algorithm)
            self._plans[key] = plan
        return plan(x, y)


@dataclass
class _Group:
    """Adapters of one layer that share one ``A`` (or one adapter, when dropout is on)."""

    a: torch.Tensor  # r x d_in, in x's dtype
    dropout: torch.nn.Module
    #: the group's rows of the batch, or None: the whole batch goes through x A^T
    rows: torch.Tensor | None
    #: (K + 1) x d_out x r: s_k B_k of the K adapters, then zeros ("gather"). B's own
    #: layout: batched GEMMs read its transpose as a view about twice as fast as a
    #: contiguous B^T when d_out is large (measured in benches/RESULTS.md).
    b_stack: torch.Tensor
    #: per row of the group's batch, the index in b_stack ("gather")
    slots: torch.Tensor
    #: per row, s B^T as a view of b_stack when row i uses adapter i (no gather copy:
    #: in a decode step that copy is r times the size of the layer's output), else None
    bt_rows: torch.Tensor | None
    #: per adapter: (rows within the group's batch, s B) ("grouped")
    members: list[tuple[torch.Tensor, torch.Tensor]]
    #: one adapter over the whole batch: the layer's own branch, (B, scale)
    whole: tuple[torch.Tensor, float] | None


@dataclass
class _LayerPlan:
    layer: LoraLayer
    groups: list[_Group]
    trainable: list[str]
    algorithm: str

    @classmethod
    def build(
        cls,
        layer: LoraLayer,
        rows: dict[str, list[int]],
        size: int,
        x: torch.Tensor,
        algorithm: str,
    ) -> _LayerPlan:
        present = [name for name in rows if layer.has_adapter(name)]
        views = {name: layer.adapter(name) for name in present}
        dropout_on = layer.training and any(
            not isinstance(v.dropout, torch.nn.Identity) for v in views.values()
        )
        by_a: dict[str, list[str]] = {}
        for name in present:
            key = name if dropout_on else views[name].a_owner
            by_a.setdefault(key, []).append(name)
        # an embedding's input is token ids: its branch computes in the weight's dtype
        dtype = x.dtype if x.is_floating_point() else layer.base_layer.weight.dtype
        device = x.device
        groups = []
        for names in by_a.values():
            first = views[names[0]]
            group_rows = sorted(i for n in names for i in rows[n])
            whole_batch = len(by_a) == 1 and not dropout_on
            local = {i: i for i in range(size)} if whole_batch else _positions(group_rows)
            count = size if whole_batch else len(group_rows)
            # Rows of no adapter in this group point at the zero slot after the K adapters.
            slot_of = [len(names)] * count
            for k, n in enumerate(names):
                for i in rows[n]:
                    slot_of[local[i]] = k
            slots = torch.tensor(slot_of, dtype=torch.long)
            # One stack and one multiply per layer (not K of each): this set-up runs on
            # every entry of the context, for every adapted layer. The scale multiplies
            # B in float32 (its master); the product is rounded once to the batch's dtype.
            b_all = torch.stack([views[n].lora_B.detach().float() for n in names])
            scales = torch.tensor(
                [views[n].scale * layer.output_scale for n in names], dtype=b_all.dtype
            )
            scaled = (b_all * scales.to(b_all.device).view(-1, 1, 1)).to(device, dtype)
            stack = torch.cat([scaled, scaled.new_zeros(1, *scaled.shape[1:])])
            members = []
            if algorithm == "grouped":
                for k, n in enumerate(names):
                    index = torch.tensor([local[i] for i in rows[n]], dtype=torch.long)
                    members.append((index.to(device), stack[k]))
            whole = None
            if len(names) == 1 and len(group_rows) == size and not dropout_on:
                whole = (first.lora_B, first.scale)
            groups.append(
                _Group(
                    a=first.lora_A.detach().to(device=device, dtype=dtype),
                    dropout=first.dropout,
                    rows=None if whole_batch else torch.tensor(group_rows, device=device),
                    b_stack=stack,
                    slots=slots.to(device),
                    bt_rows=_rows_view(stack, slots),
                    members=members,
                    whole=whole,
                )
            )
        trainable = [n for n, v in views.items() if v.requires_grad()]
        return cls(layer, groups, trainable, algorithm)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.trainable and torch.is_grad_enabled():
            raise RuntimeError(
                "per_sample_adapters is for inference: adapter "
                f"{self.trainable[0]!r} has factors that require grad; run under "
                "torch.no_grad() or torch.inference_mode() (model.generate does)"
            )
        layer = self.layer
        for group in self.groups:
            if group.whole is not None:  # one adapter for every row: the usual branch
                b, scale = group.whole
                return layer.add_branch(y, group.dropout(x), group.a, b, scale)
            xg = x if group.rows is None else x.index_select(0, group.rows)
            h = layer.project(group.dropout(xg), group.a)
            h3 = h.reshape(h.shape[0], -1, h.shape[-1])  # rows x tokens (positions) x r
            if self.algorithm == "gather":
                bt = group.bt_rows
                if bt is None:
                    bt = group.b_stack.index_select(0, group.slots).transpose(1, 2)
                if layer.kind == CONV:  # channels first: no in-place GEMM into y
                    y = _add_rows(layer, y, group.rows, _output(layer, torch.bmm(h3, bt), h))
                else:
                    y = _add_bmm(layer, y, group.rows, h3, bt)
            else:
                for index, b in group.members:
                    rows = index if group.rows is None else group.rows.index_select(0, index)
                    delta = _output(layer, h3.index_select(0, index) @ b.t(), h)
                    y = _add_rows(layer, y, rows, delta)
        return y


def _output(layer: LoraLayer, delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # rows x positions x d_out in the layer's output layout (a convolution: channels first)
    if layer.kind != CONV:
        return delta
    return layer.to_output(delta.reshape(delta.shape[0], *h.shape[1:-1], delta.shape[-1]))


def _add_bmm(
    layer: LoraLayer, y: torch.Tensor, rows: torch.Tensor | None, h3: torch.Tensor, bt: torch.Tensor
) -> torch.Tensor:
    # y (+)= h3 @ bt row by row. Over the whole batch, into y in place where that is safe:
    # baddbmm_ adds inside the GEMM instead of writing and re-reading an N x d_out delta.
    if rows is None and y.is_contiguous() and layer.may_add_in_place(y, h3):
        y.view(h3.shape[0], h3.shape[1], -1).baddbmm_(h3, bt)
        return y
    return _add_rows(layer, y, rows, torch.bmm(h3, bt))


def _add_rows(
    layer: LoraLayer, y: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor
) -> torch.Tensor:
    # y (+)= delta on the given rows (all rows for None); delta is rows x tokens x d_out.
    shape = (delta.shape[0], *y.shape[1:])
    delta = delta.reshape(shape).to(y.dtype)
    in_place = layer.may_add_in_place(y, delta)
    if rows is None:
        return y.add_(delta) if in_place else y + delta
    return y.index_add_(0, rows, delta) if in_place else y.index_add(0, rows, delta)


def _rows_view(stack: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
    # Rows that use adapters 0, 1, 2, ... in order (one request per adapter, the usual
    # many-tenant batch) read their B's straight from the stack.
    if not torch.equal(slots, torch.arange(len(slots))):
        return None
    return stack[: len(slots)].transpose(1, 2)


def _positions(rows: list[int]) -> dict[int, int]:
    return {row: i for i, row in enumerate(rows)}
