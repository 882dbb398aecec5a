"""Double / multi hashing: k salted hashes per id, the k rows summed or concatenated.

- Double hashing (Zhang et al. 2020, arXiv 2007.14523): two independent hashes, rows combined;
  its frequency-aware version gives the hottest ids exclusive rows (``hot_ids``, see
  `embtab.methods.frequency`).
- spaCy's HashEmbed ("Bloom embeddings"): k seeded hashes into one table, the k rows summed
  (``combine="sum", shared=True``).
- Hash embeddings (Svenstrup et al., NeurIPS 2017): ``e = sum_i p_i(x) * E[h_i(x)]`` with a learned
  k-vector of importance weights ``p(x)`` read from a second hashed table (``importance=True``).
  That table is a physical table of width ``ceil(k / 4) * 4`` (fbgemm needs multiples of 4; the
  padding columns are unused and get no gradient). It is parametrized as ``p = 1 + P[h(x)]``, so
  with torchrec's small symmetric init the model starts as the plain sum and weight decay pulls
  toward it (the same model family as the paper's free ``p``, only the init differs). The weights
  depend on the id, so pooling does not commute: pooled features are combined per id, then pooled.

Layout: ``shared=True`` puts the k probes into ONE table of ``rows`` rows (listed k times in
`physical_tables`); ``shared=False`` gives probe j its own table ``{table}@h{j}`` of
``rows // k`` rows. ``combine="concat"`` makes every probe ``dim / k`` wide. Each hot id reads an
exclusive row in every physical table (probe j of the r-th hot id: row ``rows + j*N + r`` of the
shared table, row ``rows // k + r`` of its own table, row ``importance_rows + r`` of the importance
table), so hot ids neither collide nor write into rows the long tail reads; in exchange the hot ids
cost ``k * N`` rows of the probe width (N rows of ``dim`` for concat, ``k * N`` rows of ``dim`` for
sum). ``max_id`` is ``None``: any non-negative id is valid and nothing scales with the id space.
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

COMBINES: tuple[str, ...] = ("sum", "concat")


@register_method(MethodKind.COMPRESSION)
@dataclass(frozen=True)
class MultiHash(SizedSpec):
    """k salted hashes into a shared table (or k tables), rows summed or concatenated.

    Args:
        rows: hashed rows in all (shared: one table of `rows`; unshared: k tables of rows // k);
            bytes grow with it (the budget knob).
        hashes: k, the number of hashes (probes) per id.
        combine: ``"sum"`` (each probe as wide as the table) or ``"concat"`` (each ``dim / k``).
        shared: one table for all probes (True) or one per probe (False).
        importance: learned per-id importance weights (hash embeddings).
        importance_rows: hashed rows of the importance table (default: `rows`).
        salt: seeds the hashes (combined with the table name and the probe).
        hot_ids: ids with exclusive rows (e.g. ``hottest_ids(counts, n)``); empty: pure hashing.
    """

    name = "multi_hash"
    size_field: ClassVar[str] = "rows"
    size_increasing: ClassVar[bool] = True

    rows: int
    hashes: int = 2
    combine: str = "sum"
    shared: bool = True
    importance: bool = False
    importance_rows: int | None = None
    salt: int = 0
    hot_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "hot_ids", tuple(self.hot_ids))

    def build(self, table: LogicalTable) -> "MultiHashMethod":
        self._check(table)
        return MultiHashMethod(table, self)

    def _check(self, table: LogicalTable) -> None:
        k = check_int(table.name, "hashes", self.hashes, 1)
        check_int(table.name, "rows", self.rows, 1 if self.shared else k)
        if self.importance_rows is not None:
            check_int(table.name, "importance_rows", self.importance_rows, 1)
        if self.combine not in COMBINES:
            raise ValueError(
                f"table {table.name!r}: combine must be one of {COMBINES}, got {self.combine!r}"
            )
        if self.combine == "concat" and (table.dim % k or (table.dim // k) % 4):
            raise ValueError(
                f"table {table.name!r}: concat of {k} probes splits width {table.dim} into "
                f"{table.dim / k:.3g}; expected dim / hashes to be a multiple of 4"
            )
        check_hot_ids(table.name, self.hot_ids, table.cardinality)


def _round_up4(n: int) -> int:
    return -(-n // 4) * 4


def _probe_tables(
    table: LogicalTable, spec: MultiHash, hot: int
) -> tuple[list[PhysicalTable], list[int], list[int]]:
    """The k probes' tables, the first exclusive (hot) row of each probe, and each hashed range."""
    k = spec.hashes
    width = table.dim // k if spec.combine == "concat" else table.dim
    if spec.shared:
        shared = PhysicalTable(table.name, spec.rows + k * hot, width)
        return [shared] * k, [spec.rows + j * hot for j in range(k)], [spec.rows] * k
    rows = spec.rows // k
    tables = [PhysicalTable(f"{table.name}@h{j}", rows + hot, width) for j in range(k)]
    return tables, [rows] * k, [rows] * k


class MultiHashMethod(TableMethod):
    def __init__(self, table: LogicalTable, spec: MultiHash) -> None:
        super().__init__(table)
        self.max_id = None
        self.probes = spec.hashes
        self.concat = spec.combine == "concat"
        self.importance = spec.importance
        self.pooling_commutes = not spec.importance
        hot = len(spec.hot_ids)
        tables, bases, self.range_sizes = _probe_tables(table, spec, hot)
        self.salts = [salt_of(table.name, spec.salt, j) for j in range(spec.hashes)]
        if spec.importance:
            rows = spec.importance_rows or spec.rows
            width = _round_up4(spec.hashes)
            tables.append(PhysicalTable(f"{table.name}@importance", rows + hot, width))
            bases.append(rows)
            self.range_sizes.append(rows)
            self.salts.append(salt_of(table.name, spec.salt, "importance"))
        self.physical_tables = tuple(tables)
        self.hot = HotIds(spec.hot_ids, bases)

    def hashes(self) -> list[tuple[int, int]]:
        return list(zip(self.range_sizes, self.salts))

    def remap_hashed(self, ids: torch.Tensor, hashed: list[torch.Tensor]) -> torch.Tensor:
        return self.hot.route(ids, torch.stack(hashed))

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        probes = vectors[: self.probes]
        if self.importance:
            weights = 1.0 + vectors[self.probes][..., : self.probes]
            probes = [v * weights[..., j : j + 1] for j, v in enumerate(probes)]
        if self.concat:
            return torch.cat(probes, dim=-1)
        total = probes[0]
        for v in probes[1:]:
            total = total + v
        return total

    def combine_signature(self) -> tuple | None:
        return None if self.importance else ("multi_hash", self.probes, self.concat)
