"""What every compression method provides: remap, physical tables, combine, bytes.

A method spec (a frozen dataclass in `embtab.config`) is compiled for one logical table into a
`TableMethod`. `embtab.EmbeddingTables` then places every method's physical tables in one fused
torchrec collection and calls `remap` before and `combine` after the lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from embtab.config import LogicalTable
from embtab.hashing import hash_to_range


@dataclass(frozen=True)
class PhysicalTable:
    """A table that is really allocated: `rows` x `dim` float32 in the fused collection.

    Methods that share one physical table across logical tables (feature multiplexing) give it the
    same `name`; the collection allocates it once. `init` is the uniform initialization range
    (torchrec's default, U(-sqrt(1/rows), sqrt(1/rows)), when None); `init_std` instead draws
    every weight from N(0, init_std**2) (TT-Rec's Gaussian cores).
    """

    name: str
    rows: int
    dim: int
    init: tuple[float, float] | None = None
    init_std: float | None = None

    def init_range(self) -> dict[str, Any]:
        """Keyword arguments for torchrec's table configs."""
        if self.init_std is not None:
            return {"init_fn": partial(torch.nn.init.normal_, mean=0.0, std=self.init_std)}
        if self.init is None:
            return {}
        return {"weight_init_min": self.init[0], "weight_init_max": self.init[1]}


class TableMethod(nn.Module):
    """A compression method compiled for one logical table.

    Subclasses set `physical_tables` (P tables) and implement `remap` and `combine`.

    Attributes:
        pooling_commutes: True when ``combine(pool(rows)) == pool(combine(rows))`` (add, concat),
            so pooled features may pool inside the fused kernel; False makes the collection look
            rows up per id, combine, then pool.
        combine_uses_ids: `combine` takes the logical ids too, ``combine(vectors, ids)`` with `ids`
            shaped like the vectors' leading dimensions (-1 where a per-id block is padded); for
            methods whose combine depends on the id (sign hashes, frequency groups). Such a
            method combines per id (``pooling_commutes = False``) and on its own
            (`combine_signature` None).
        max_id: ids must be below this (the full table); ``None`` accepts any non-negative id.
        process_group: the ranks the tables were fused over (`embtab.fuse` sets it); None for
            tables used on their own, whose methods then see only local ids.
    """

    pooling_commutes: bool = True
    combine_uses_ids: bool = False

    def __init__(self, table: LogicalTable) -> None:
        super().__init__()
        self.table = table
        self.physical_tables: tuple[PhysicalTable, ...] = ()
        self.max_id: int | None = table.cardinality
        self.process_group: dist.ProcessGroup | None = None

    @property
    def out_dim(self) -> int:
        return self.table.dim

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        """Map logical ids ``[n]`` to physical rows ``[P, n]``, one row of ids per physical table
        (for a method that declares `hashes`: `remap_hashed` of those hashes)."""
        requests = self.hashes()
        if not requests:
            raise NotImplementedError
        ids = ids.to(torch.int64)
        return self.remap_hashed(ids, [hash_to_range(ids, m, salt) for m, salt in requests])

    def hashes(self) -> list[tuple[int, int]]:
        """``(num_buckets, salt)`` of every hash of the ids that `remap` needs (none by default).
        A method that declares them implements `remap_hashed`; the collection then hashes every
        table's ids in one vectorized call (`embtab.hashing.hash_to_ranges`)."""
        return []

    def remap_hashed(self, ids: torch.Tensor, hashed: list[torch.Tensor]) -> torch.Tensor:
        """`remap` given ``hash_to_range(ids, *h)`` for each ``h`` of `hashes`."""
        raise NotImplementedError

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """Combine P looked-up tensors ``[..., dim_p]`` into the logical vectors ``[..., out_dim]``."""
        raise NotImplementedError

    def combine_signature(self) -> tuple | None:
        """Tables whose methods return equal signatures may be combined in one call on stacked
        vectors ``[..., tables, features, dim]`` (`combine` must then not depend on the table);
        None (the default) combines this table on its own."""
        return None

    def extra_bytes(self) -> int:
        """Bytes of the method's own parameters and buffers (projections, importance weights)."""
        tensors = list(self.parameters()) + list(self.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)
