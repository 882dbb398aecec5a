"""Mixed-dimension embeddings by popularity (Ginart et al., arXiv 1909.11810).

A table's width follows its ids' popularity: with ``n`` ids (each id of a table with more ids is,
on average, less popular) the width is ``base_dim * (reference_rows / n) ** alpha`` (``alpha`` the
temperature, 0.3 in DLRM's flags), rounded to a multiple of 4 (fbgemm's kernels need it) and kept
in ``[4, D]``. A table narrower than the model's width ``D`` is followed by a bias-free linear
projection to ``D`` (Xavier init), counted in the bytes. ``base_dim`` is the budget knob.

The projection is linear, so sum pooling commutes with it and pooled features pool in the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from embtab.checks import check_int
from embtab.config import LogicalTable
from embtab.methods.base import PhysicalTable, SizedSpec, TableMethod
from embtab.registry import MethodKind, register_method


@register_method(MethodKind.SEARCH_RESULT)
@dataclass(frozen=True)
class MDE(SizedSpec):
    """Per-table widths ``base_dim * (reference_rows / rows) ** alpha``, projected to the model's width.

    Args:
        base_dim: the width of a table of ``reference_rows`` ids (bytes grow with it: the budget knob).
        alpha: the temperature; 0 gives every table ``base_dim``.
        reference_rows: the row count that gets exactly ``base_dim`` (Ginart et al. use the
            smallest table's; 1 keeps the spec independent of the other tables).
    """

    name = "mde"
    size_field: ClassVar[str] = "base_dim"
    size_increasing: ClassVar[bool] = True
    size_scope: ClassVar[str] = "spec"

    base_dim: int = 16
    alpha: float = 0.3
    reference_rows: int = 1

    def build(self, table: LogicalTable) -> "MDEMethod":
        check_int(table.name, "base_dim", self.base_dim, 1)
        if self.alpha < 0 or self.reference_rows < 1:
            raise ValueError(
                f"table {table.name!r}: expected alpha >= 0 and reference_rows >= 1, "
                f"got {self.alpha} and {self.reference_rows}"
            )
        return MDEMethod(table, self.width(table))

    def width(self, table: LogicalTable) -> int:
        """The table's width: the popularity rule, rounded to a multiple of 4 in ``[4, dim]``."""
        raw = self.base_dim * (self.reference_rows / table.cardinality) ** self.alpha
        return int(min(max(4 * round(raw / 4), 4), table.dim - table.dim % 4 or 4))


class MDEMethod(TableMethod):
    def __init__(self, table: LogicalTable, width: int) -> None:
        super().__init__(table)
        self.width = width
        self.physical_tables = (PhysicalTable(table.name, table.cardinality, width),)
        self.projection = None
        if width != table.dim:
            self.projection = nn.Linear(width, table.dim, bias=False)
            nn.init.xavier_uniform_(self.projection.weight)

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.unsqueeze(0)

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return vectors[0] if self.projection is None else self.projection(vectors[0])
