"""PEP, learnable embedding sizes by soft thresholding (Liu et al., ICLR 2021).

Every element of a looked-up row is shrunk: ``v' = sign(v) * relu(|v| - g(s))`` with
``g = sigmoid`` and a learnable ``s`` whose granularity is

- ``global``: one ``s`` for the table; ``dimension``: one per column (both dense parameters,
  trained on their own Adam inside the backward pass, at ``threshold_lr`` with L2
  ``threshold_decay``: the reference trains them with Adam 1e-3 and L2 1e-5 with the rest, and it
  is that decay, normalized by Adam, that raises ``s`` steadily from its very negative start);
- ``feature``: one per id; ``feature_dim``: one per element. These live in a second physical table
  looked up with the same ids (``n x 4``, column 0 used, or ``n x D``), so they are trained by the
  fused sparse optimizer (the reference uses Adam for them too: a deviation embtab needs to keep
  per-id state out of Python).

Elements at zero are pruned, which gives each id its own effective width. The search then keeps
elements whose margin ``|v| - g(s)`` exceeds ``shift`` (0, or raised by `embtab.search` to fit a
byte budget) and retrains the kept elements from their initial values (the lottery-ticket rewind).
The shrinkage is per element, so lookups are per id (``pooling_commutes = False``).
The weights start Xavier-uniform, as in the reference (``init="torchrec"``: U(+-sqrt(1/n))).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from embtab.config import LogicalTable, MethodSpec
from embtab.methods.base import LearnedSizeSpec, MaskedMethod, PhysicalTable
from embtab.methods.optembed import INITS, xavier_range
from embtab.methods.pruned import PrunedTable
from embtab.registry import MethodKind, register_method

GRANULARITIES: tuple[str, ...] = ("global", "dimension", "feature", "feature_dim")


@register_method(MethodKind.LEARNED_SIZE)
@dataclass(frozen=True)
class PEP(LearnedSizeSpec):
    """PEP's soft-thresholded table (train it, then `embtab.search` prunes and rewinds it).

    Args:
        granularity: one of ``global``, ``dimension``, ``feature``, ``feature_dim``.
        init_threshold: initial ``s`` (``g(s) = sigmoid(s)`` is the threshold; the reference: -15
            on MovieLens-1M, -150 on Criteo and Avazu).
        threshold_lr: Adam learning rate of a dense ``s`` (global, dimension); reference 1e-3.
        threshold_decay: L2 weight decay of a dense ``s`` (the reference's 1e-5).
        init: ``"xavier"`` (the reference) or ``"torchrec"``.
        budget_bytes: bytes the export must fit (0: prune at the learned thresholds only).
        budget_optimizer: the sparse optimizer whose state the budget counts ("" for weights only).
    """

    name = "pep"

    granularity: str = "dimension"
    init_threshold: float = -15.0
    threshold_lr: float = 1e-3
    threshold_decay: float = 1e-5
    init: str = "xavier"
    budget_bytes: int = 0
    budget_optimizer: str = ""

    def build(self, table: LogicalTable) -> "PEPMethod":
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"table {table.name!r}: granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.init not in INITS or self.threshold_lr <= 0 or self.threshold_decay < 0:
            raise ValueError(
                f"table {table.name!r}: expected init in {INITS}, threshold_lr > 0, threshold_decay >= 0; "
                f"got {self.init!r}, {self.threshold_lr}, {self.threshold_decay}"
            )
        return PEPMethod(table, self)

    def floor_method(self) -> MethodSpec:
        """The smallest export: no row kept, four columns."""
        return PrunedTable(kept=0, width=4)


class PEPMethod(MaskedMethod):
    pooling_commutes = False

    def __init__(self, table: LogicalTable, spec: PEP) -> None:
        super().__init__(table)
        self.granularity = spec.granularity
        init = xavier_range(table.cardinality, table.dim) if spec.init == "xavier" else None
        weights = PhysicalTable(table.name, table.cardinality, table.dim, init=init)
        self.per_id = spec.granularity in ("feature", "feature_dim")
        self.s: nn.Parameter | None = None  # the shared thresholds; per-id ones are a physical table
        if self.per_id:
            width = 4 if spec.granularity == "feature" else table.dim
            s0 = spec.init_threshold
            thresholds = PhysicalTable(f"{table.name}@threshold", table.cardinality, width, init=(s0, s0))
            self.physical_tables = (weights, thresholds)
        else:
            self.physical_tables = (weights,)
            size = () if spec.granularity == "global" else (table.dim,)
            self.s = nn.Parameter(torch.full(size, spec.init_threshold))
            if self.s.device.type != "meta":
                settings = {"lr": spec.threshold_lr, "weight_decay": spec.threshold_decay}
                apply_optimizer_in_backward(torch.optim.Adam, [self.s], settings)
        self.register_buffer("shift", torch.tensor(0.0), persistent=False)

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.unsqueeze(0).expand(len(self.physical_tables), -1)

    def margins(self, rows: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """``|v| - g(s)`` per element of rows ``[..., D]`` (``s`` the looked-up per-id thresholds)."""
        if s is None:
            s = self.s
        elif self.granularity == "feature":
            s = s[..., :1]
        return rows.abs() - torch.sigmoid(s)

    @torch.no_grad()
    def scores(self, weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) scores: the largest element margin of each row and of each column, so a
        row (column) has a nonzero element after shrinking at a shift below its score."""
        margin = self.margins(weights[0], weights[1] if self.per_id else None)
        return margin.amax(-1), margin.amax(0)

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        v = vectors[0]
        margin = self.margins(v, vectors[1] if self.per_id else None)
        return torch.sign(v) * torch.relu(margin) * (margin > self.shift)
