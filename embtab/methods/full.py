"""The full (uncompressed) table: one row per id, the reference every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embtab.config import LogicalTable, MethodSpec
from embtab.methods.base import PhysicalTable, TableMethod
from embtab.registry import MethodKind, register_method


@register_method(MethodKind.COMPRESSION)
@dataclass(frozen=True)
class FullTable(MethodSpec):
    """`cardinality` x `dim` rows; ids are range-checked, never clamped."""

    name = "full"

    def build(self, table: LogicalTable) -> "FullTableMethod":
        return FullTableMethod(table)


class FullTableMethod(TableMethod):
    def __init__(self, table: LogicalTable) -> None:
        super().__init__(table)
        self.physical_tables = (PhysicalTable(table.name, table.cardinality, table.dim),)

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.unsqueeze(0)

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return vectors[0]

    def combine_signature(self) -> tuple | None:
        return ("identity",)
