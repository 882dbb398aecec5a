"""Dedup: a trained table whose near-duplicate blocks of rows are stored once (Zhou et al., VLDB
2022, "Serving Deep Learning Models with Deduplication from Relational Databases", as the VLDB 2024
benchmark adapts it to embedding tables).

The table's ``n`` ids are cut into ``m = ceil(n / block_rows)`` blocks of ``block_rows``
consecutive ids; ``blocks`` of them are stored (``blocks * block_rows`` physical rows) and a block
map (one int32 per block) sends each logical block to the stored block it was merged into:

    row(id) = block_map[id // block_rows] * block_rows + id % block_rows

Which blocks merge is decided after training the full table (`embtab.search.dedup.deduplicate`:
L2-LSH candidates, then an element-wise closeness test) until ``blocks`` remain; the merged table
is then fine-tuned through this remap. ``blocks`` is the budget knob (`embtab.budget` sizes it per
table); the block map, a persistent buffer, is counted in the bytes. Before the stage fills it,
the map sends block ``j`` to ``j % blocks``.

Lookups are rows of one table: pooling commutes and pooled features pool in the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from embtab.config import LogicalTable
from embtab.methods.base import PhysicalTable, SizedSpec, TableMethod
from embtab.checks import check_int
from embtab.registry import MethodKind, register_method


@register_method(MethodKind.SEARCH_RESULT)
@dataclass(frozen=True)
class Dedup(SizedSpec):
    """Blocks of ``block_rows`` ids, ``blocks`` of them stored; the rest read a merged block.

    Args:
        blocks: stored blocks (the budget knob), in ``[1, ceil(n / block_rows)]``.
        block_rows: ids per block (the benchmark: 10,000 on Criteo).
        tolerance: the closeness test's element tolerance (benchmark 0.01).
        similarity: share of elements within `tolerance` for two blocks to be duplicates (0.7).
        lsh_width: the L2-LSH bucket width ``r`` (0.09), one hash per band.
        lsh_bands: the L2-LSH bands ``L`` (90); blocks sharing a bucket in any band are candidates.
        relax: when too few blocks pass the closeness test for the budget, go on merging each
            remaining block into its nearest (L2) earlier block, nearest first; False refuses.
        seed: the LSH projections' seed.
    """

    name = "dedup"
    size_field: ClassVar[str] = "blocks"
    size_increasing: ClassVar[bool] = True
    size_scope: ClassVar[str] = "table"

    blocks: int = 1
    block_rows: int = 10_000
    tolerance: float = 0.01
    similarity: float = 0.7
    lsh_width: float = 0.09
    lsh_bands: int = 90
    relax: bool = True
    seed: int = 0

    @staticmethod
    def physical_name(table: str) -> str:
        """Name of the merged physical table of logical table `table`."""
        return f"{table}@dedup"

    def total_blocks(self, cardinality: int) -> int:
        """Blocks the table's ids are cut into."""
        return -(-cardinality // self.block_rows)

    def build(self, table: LogicalTable) -> "DedupMethod":
        check_int(table.name, "block_rows", self.block_rows, 1)
        check_int(table.name, "blocks", self.blocks, 1)
        check_int(table.name, "lsh_bands", self.lsh_bands, 1)
        total = self.total_blocks(table.cardinality)
        if self.blocks > total:
            raise ValueError(
                f"table {table.name!r}: blocks must be <= {total} (its {table.cardinality} ids in blocks of "
                f"{self.block_rows}), got {self.blocks}"
            )
        if self.tolerance < 0 or not 0 < self.similarity <= 1 or self.lsh_width <= 0:
            raise ValueError(
                f"table {table.name!r}: expected tolerance >= 0, similarity in (0, 1] and lsh_width > 0; "
                f"got tolerance={self.tolerance}, similarity={self.similarity}, lsh_width={self.lsh_width}"
            )
        return DedupMethod(table, self)


class DedupMethod(TableMethod):
    def __init__(self, table: LogicalTable, spec: Dedup) -> None:
        super().__init__(table)
        self.block_rows = spec.block_rows
        rows = spec.blocks * spec.block_rows
        self.physical_tables = (PhysicalTable(Dedup.physical_name(table.name), rows, table.dim),)
        total = spec.total_blocks(table.cardinality)
        self.register_buffer("block_map", (torch.arange(total) % spec.blocks).to(torch.int32))

    def set_block_map(self, block_map: torch.Tensor) -> None:
        """Store the stage's map ``[ceil(n / block_rows)]`` of stored-block indices."""
        blocks = self.physical_tables[0].rows // self.block_rows
        if block_map.shape != self.block_map.shape or int(block_map.min()) < 0 or int(block_map.max()) >= blocks:
            raise ValueError(
                f"table {self.table.name!r}: block map of shape {tuple(block_map.shape)} with values in "
                f"[{int(block_map.min())}, {int(block_map.max())}]; expected shape {tuple(self.block_map.shape)} "
                f"and values in [0, {blocks})"
            )
        self.block_map.copy_(block_map.to(torch.int32))

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(torch.int64)
        block = torch.div(ids, self.block_rows, rounding_mode="floor")
        stored = self.block_map[block].to(torch.int64)
        return (stored * self.block_rows + ids - block * self.block_rows).unsqueeze(0)

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return vectors[0]
