"""The hashing trick: id -> h(id, salt) mod m, one m-row table (Weinberger et al. 2009).

Every id, whatever its value, reads row ``hash_to_range(id, rows, salt_of(table, salt))``: collisions
are permanent and the table never grows with the id space, so ``max_id`` is ``None`` (any
non-negative id is valid; a feature of 1e10 ids costs ``rows`` rows). Salting with the table name
makes different tables collide differently. With ``hot_ids`` (the frequency-aware hybrid of Zhang
et al. 2020, see `embtab.methods.frequency`) the N hottest ids get exclusive rows ``rows ..
rows + N - 1`` of the same physical table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from embtab.config import LogicalTable
from embtab.hashing import salt_of
from embtab.methods.base import PhysicalTable, SizedSpec, TableMethod
from embtab.checks import check_int
from embtab.methods.frequency import HotIds, check_hot_ids
from embtab.registry import MethodKind, register_method


@register_method(MethodKind.COMPRESSION)
@dataclass(frozen=True)
class HashingTrick(SizedSpec):
    """`rows` hashed rows (+ one exclusive row per hot id) of the table's width.

    Args:
        rows: hashed rows m; bytes grow with it (the budget knob).
        salt: seeds the hash (combined with the table name).
        hot_ids: ids that get exclusive rows (e.g. ``hottest_ids(counts, n)``); empty: pure hashing.
    """

    name = "hashing_trick"
    size_field: ClassVar[str] = "rows"
    size_increasing: ClassVar[bool] = True

    rows: int
    salt: int = 0
    hot_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "hot_ids", tuple(self.hot_ids))

    def build(self, table: LogicalTable) -> "HashingTrickMethod":
        check_int(table.name, "rows", self.rows, 1)
        check_hot_ids(table.name, self.hot_ids, table.cardinality)
        return HashingTrickMethod(table, self)


class HashingTrickMethod(TableMethod):
    def __init__(self, table: LogicalTable, spec: HashingTrick) -> None:
        super().__init__(table)
        self.rows = spec.rows
        self.salt = salt_of(table.name, spec.salt)
        self.hot = HotIds(spec.hot_ids, bases=[spec.rows])
        self.physical_tables = (PhysicalTable(table.name, spec.rows + self.hot.count, table.dim),)
        self.max_id = None

    def hashes(self) -> list[tuple[int, int]]:
        return [(self.rows, self.salt)]

    def remap_hashed(self, ids: torch.Tensor, hashed: list[torch.Tensor]) -> torch.Tensor:
        return self.hot.route(ids, hashed[0].unsqueeze(0))

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return vectors[0]

    def combine_signature(self) -> tuple | None:
        return ("identity",)
