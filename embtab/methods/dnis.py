"""DNIS-style differentiable dimension search (Cheng et al., arXiv 2006.04466), a lighter alternative.

Each table's looked-up vectors are multiplied by a learnable soft selection weight per dimension,
``e' = alpha * e`` (``alpha`` initialized to 1, trained with the rest of the dense model). After
training, the dimensions with the smallest ``|alpha|`` are pruned: `embtab.search` raises a shift
until the export fits a byte budget and stores ``alpha * e`` on the kept columns. Rows are never
pruned, so the export keeps every id at a width of at least 4.

Simplifications (said so where results are reported): one weight vector per table (the paper can
split a table into frequency blocks with one vector each), and ``alpha`` trained on the training
loss jointly with the model (the paper's relaxation tunes it on validation data).
The weight is linear, so pooling commutes and pooled features pool in the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from embtab.config import LogicalTable, MethodSpec
from embtab.methods.base import LearnedSizeSpec, MaskedMethod, PhysicalTable
from embtab.methods.pruned import PrunedTable
from embtab.registry import MethodKind, register_method


@register_method(MethodKind.LEARNED_SIZE)
@dataclass(frozen=True)
class DNIS(LearnedSizeSpec):
    """Soft per-dimension selection weights; the export keeps the largest ones within a budget.

    Args:
        budget_bytes: bytes the export must fit (0: keep every dimension).
        budget_optimizer: the sparse optimizer whose state the budget counts ("" for weights only).
    """

    name = "dnis"

    budget_bytes: int = 0
    budget_optimizer: str = ""

    def build(self, table: LogicalTable) -> "DNISMethod":
        if table.dim % 4:
            raise ValueError(f"table {table.name!r}: width must be a multiple of 4, got {table.dim}")
        return DNISMethod(table)

    def floor_method(self) -> MethodSpec:
        """DNIS keeps every row, so its smallest export keeps them all at width 4 (the budget
        solver's floor check only needs a lower bound)."""
        return PrunedTable(kept=0, width=4)


class DNISMethod(MaskedMethod):
    def __init__(self, table: LogicalTable) -> None:
        super().__init__(table)
        self.physical_tables = (PhysicalTable(table.name, table.cardinality, table.dim),)
        self.alpha = nn.Parameter(torch.ones(table.dim))
        self.register_buffer("shift", torch.tensor(0.0), persistent=False)

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.unsqueeze(0)

    @torch.no_grad()
    def scores(self, weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) scores: every row is kept (+inf); a column while ``|alpha|`` exceeds the shift."""
        return torch.full((weights[0].shape[0],), float("inf")), self.alpha.detach().abs()

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return vectors[0] * (self.alpha * (self.alpha.abs() > self.shift))
