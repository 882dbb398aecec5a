"""An offloaded table: the full table lives in a backing store; a cache of its rows is fused.

The method's one physical table is the cache, ``cache_rows x dim``, in the same fused torchrec
collection as every other table, so fbgemm's kernels and fused optimizer train it unchanged.
Offloaded tables that name the same `cache` (default: one cache for all of them) share it, as the
tables of an fbgemm TBE share its UVM cache: the tables' rows form one row space (each table's ids
offset by the rows before it), so the cache's bookkeeping runs once per batch, not once per table.
The remap is the cache's slot map: offset + id -> slot. The rows of a batch must be cached before its forward;
`embtab.offload.Prefetcher` does that in a background thread while earlier batches train (see
`embtab.offload` for the store, the cache and the eviction policies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from embtab.checks import check_integer
from embtab.config import LogicalTable, MethodSpec
from embtab.methods.base import PhysicalTable, TableMethod
from embtab.registry import MethodKind, register_method

if TYPE_CHECKING:
    from embtab.offload.cache import RowCache

# The eviction policies a spec may name (`embtab.offload.policy` implements them).
POLICIES: tuple[str, ...] = ("lru", "lfu", "lookahead")


@register_method(MethodKind.PLACEMENT)
@dataclass(frozen=True)
class Offloaded(MethodSpec):
    """The full table in a backing store (RAM or an mmap file) behind a fused cache.

    Args:
        cache_rows: slots of the cache (the fused physical table), shared by every table that
            names the same `cache`; at least the distinct rows of one batch.
        cache: name of the cache's physical table; tables sharing it need the same width,
            `cache_rows`, `policy` and `reclaim`.
        policy: eviction policy, one of ``"lru"``, ``"lfu"``, ``"lookahead"``.
        reclaim: fraction of the cache the policy frees at once when it is full (its scoring
            touches every slot, so it runs once per ``reclaim * cache_rows`` missed rows rather
            than every batch; the cost is that fraction of capacity, half of it on average).
    """

    name = "offloaded"

    cache_rows: int
    policy: str = "lookahead"
    reclaim: float = 0.125
    cache: str = "offload_cache"

    def build(self, table: LogicalTable) -> "OffloadedMethod":
        check_integer(self.cache_rows, 1, f"table {table.name!r} (offloaded): cache_rows")
        if self.policy not in POLICIES:
            raise ValueError(
                f"table {table.name!r} (offloaded): unknown eviction policy {self.policy!r}; "
                f"expected one of {POLICIES}"
            )
        if not 0 < self.reclaim <= 1:
            raise ValueError(
                f"table {table.name!r} (offloaded): reclaim must be a fraction in (0, 1], got {self.reclaim!r}"
            )
        return OffloadedMethod(table, self)


class OffloadedMethod(TableMethod):
    """Remap ids to cache slots through the slot map of the attached `RowCache`."""

    def __init__(self, table: LogicalTable, spec: Offloaded) -> None:
        super().__init__(table)
        self.spec = spec
        self.physical_tables = (PhysicalTable(spec.cache, spec.cache_rows, table.dim),)
        self.cache: RowCache | None = None
        self.offset = 0

    def bind_cache(self, cache: "RowCache", offset: int) -> None:
        """Bind the table to its cache (`embtab.offload.attach` calls it once the stores are
        known): ids read rows ``offset + id`` of the cache's row space."""
        self.cache, self.offset = cache, offset

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError(
                f"offloaded table {self.table.name!r} has no backing store; expected "
                "embtab.offload.attach(model, stores) before the first forward"
            )
        return self.cache.slots_of(ids + self.offset).unsqueeze(0)

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return vectors[0]
