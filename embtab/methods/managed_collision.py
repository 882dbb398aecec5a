"""Managed collisions: the hottest ids get rows of their own, through torchrec's MCH module.

Zero-collision hashing ("ZCH") as in torchrec's `ManagedCollisionCollection` /
`MCHManagedCollisionModule` (torchrec/modules/mc_modules.py), reused as is, not rewritten: the module
keeps a sorted map raw id -> row for at most ``rows - 1`` ids; every `eviction_interval` training
steps it counts the ids seen since the last update and admits the best of them, evicting the
worst mapped ids by LFU (access counts) or LRU (last access step). An id that holds no row reads
the shared miss row ``rows - 1`` (torchrec's convention). Its state (the id map and the eviction
metadata) is buffers of the module, so it is part of the model's `state_dict` and checkpoints.
Idea and eviction policies: Liu et al., "Monolith: Real Time Recommendation System With
Collisionless Embedding Table" (2022); torchrec's implementation (``MCHManagedCollisionModule``).

Evicted rows. A row handed to a new id still holds the vector (and optimizer state) its previous
id trained. torchrec's unsharded `ManagedCollisionEmbeddingCollection` leaves it so (its `evict` is
a no-op); its sharded one re-initializes the row and zeroes its optimizer state before the lookup.
embtab does the same: `embtab.fuse` (through `bind_fused`), or `embtab.fused_state.attach_row_reset(tables)`
on an unfused module, makes every managed-collision table re-initialize its evicted rows (uniform in
+-sqrt(1/rows), torchrec's default init) and zero their fused optimizer state, inside `remap`, i.e.
before the lookup that first reads them. Unbound tables (unfused, no `attach_row_reset`) leave
evicted rows as they are, as torchrec's unsharded module does.

Caveats inherited from torchrec: the id history buffer is sized from the first training batch
(1.25 x its ids x `eviction_interval`); ids beyond it in a larger batch are not counted for
admission (they are still remapped). New ids are admitted only at eviction steps, so with
``eviction_interval > 1`` ids first seen between updates read the miss row until the next update.
The module's buffers live on the device the table was built on (the default device at build
time); `nn.Module.to` moves them, but torchrec's eviction policy keeps references to the
originals, so build on the device you train on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Mapping

import torch
import torch.distributed as dist
from torchrec import JaggedTensor
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    MCHEvictionPolicy,
    MCHManagedCollisionModule,
)

from embtab.checks import check_integer, is_integer
from embtab.collectives import gather_rows
from embtab.config import LogicalTable
from embtab.hashing import salt_of
from embtab.methods.base import BoundAfterFusing, PhysicalTable, SizedSpec
from embtab.registry import MethodKind, register_method

if TYPE_CHECKING:
    from embtab.fused_state import FusedTables, Shard, StoredTable

MAX_INPUT_HASH_SIZE = 2**63 - 1
EVICTIONS: tuple[str, ...] = ("lfu", "lru")


@register_method(MethodKind.COMPRESSION)
@dataclass(frozen=True)
class ManagedCollision(SizedSpec):
    """`rows` x `dim` table whose rows torchrec's MCH module hands to the hottest ids.

    Args:
        rows: rows of the table; ``rows - 1`` ids hold a row of their own, the last row is
            shared by every other id (at least 2).
        eviction: ``"lfu"`` (keep the most frequently seen ids) or ``"lru"`` (the most recent).
        eviction_interval: training steps between updates of the id map (1: every batch's ids
            are admitted before its lookup).
        input_hash_size: ids must lie in ``[0, input_hash_size)``; default the table's
            cardinality; up to ``2**63 - 1`` for raw 64-bit ids.
    """

    name = "managed_collision"
    size_field: ClassVar[str] = "rows"
    size_increasing: ClassVar[bool] = True

    rows: int
    eviction: Literal["lfu", "lru"] = "lfu"
    eviction_interval: int = 1
    input_hash_size: int | None = None

    def check(self, table: LogicalTable) -> int:
        """The input hash size for `table`, after checking every parameter."""
        where = f"table {table.name!r} (managed_collision)"
        for field_name, low in (("rows", 2), ("eviction_interval", 1)):
            check_integer(getattr(self, field_name), low, f"{where}: {field_name}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"{where}: eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        size = table.cardinality if self.input_hash_size is None else self.input_hash_size
        if not is_integer(size) or not 1 <= size <= MAX_INPUT_HASH_SIZE:
            raise ValueError(
                f"{where}: input_hash_size must be an integer in [1, 2**63 - 1], got {size!r}"
            )
        return size

    def build(self, table: LogicalTable) -> "ManagedCollisionMethod":
        return ManagedCollisionMethod(table, self)


def _policy(eviction: str) -> MCHEvictionPolicy:
    return LFU_EvictionPolicy() if eviction == "lfu" else LRU_EvictionPolicy()


class ManagedCollisionMethod(BoundAfterFusing):
    """Remap through a `MCHManagedCollisionModule` (profile in training mode, then remap).

    Bound after fusing: it profiles the ids of every rank of the process group the tables were
    fused over (None: only its own), and resets the rows it evicts in the stored weights and
    fused optimizer state.
    """

    pooling_commutes = True

    def __init__(self, table: LogicalTable, spec: ManagedCollision) -> None:
        super().__init__(table)
        self.max_id = spec.check(table)
        self.rows = spec.rows
        self.mch = MCHManagedCollisionModule(
            zch_size=spec.rows,
            device=torch.get_default_device(),
            eviction_policy=_policy(spec.eviction),
            eviction_interval=spec.eviction_interval,
            input_hash_size=self.max_id,
            name=table.name,
        )
        self.physical_tables = (PhysicalTable(table.name, spec.rows, table.dim),)
        self.row_reset: RowReset | None = None
        self.process_group: dist.ProcessGroup | None = None

    @property
    def miss_row(self) -> int:
        """The row every id without a row of its own reads."""
        return self.rows - 1

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        values = ids.to(torch.int64)
        if self.training:
            # every rank admits and evicts on the ids of all ranks, so all keep one id -> row map
            seen = values if self.process_group is None else gather_rows(values, self.process_group)
            self.mch.profile(self._features(seen))
        rows = self.mch.remap(self._features(values))[self.table.name].values()
        evicted = self.mch.evict()  # always consumed, else torchrec accumulates it
        if evicted is not None and self.row_reset is not None:
            self.row_reset(evicted)
        return rows.unsqueeze(0)

    def _features(self, values: torch.Tensor) -> dict[str, JaggedTensor]:
        offsets = torch.tensor([0, values.numel()], dtype=torch.int64, device=values.device)
        return {self.table.name: JaggedTensor(values=values, offsets=offsets)}

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return vectors[0]

    def combine_signature(self) -> tuple | None:
        return ("identity",)

    def extra_bytes(self) -> int:
        """Bytes of the id map and eviction metadata (the module's checkpointed buffers).

        The id history buffer (8 bytes per id of ``1.25 x first batch x eviction_interval``, 16
        for LRU) depends on the batch, not on the configuration, and is not counted.
        """
        return sum(t.numel() * t.element_size() for t in self.mch.state_dict().values())

    def bind_fused(self, fused: FusedTables) -> None:
        self.process_group = fused.process_group
        self.bind_row_reset(fused.tables)

    def bind_row_reset(self, stored: Mapping[str, StoredTable]) -> None:
        """Reset evicted rows in the stored weights and fused optimizer state of this table."""
        name = self.physical_tables[0].name
        table = stored.get(name)
        if table is None:
            raise ValueError(f"table {name!r}: no weight found in the collection to reset rows of")
        self.row_reset = RowReset(
            table.weight_shards(),
            table.state_shards(),
            self.physical_tables[0].dim,
            math.sqrt(1.0 / self.rows),
            salt_of("row_reset", name),
        )

    def mapped_ids(self) -> dict[int, int]:
        """The id -> row map as a dict (for inspection and tests; not for the hot path)."""
        ids = self.mch._mch_sorted_raw_ids
        rows = self.mch._mch_remapped_ids_mapping
        held = ids != torch.iinfo(torch.int64).max
        return dict(zip(ids[held].tolist(), rows[held].tolist()))


class RowReset:
    """Re-initialize rows of one physical table, and zero their optimizer state, in place.

    Holds the local shards of the table's weights and of its fused optimizer state (as torchrec
    exposes them through `state_dict` / `fused_optimizer`). Every call draws the fresh values of
    all the evicted rows at the table's full width, then each shard takes its rows and columns, so
    the values do not depend on how the table is sharded.
    """

    def __init__(self, weights: list[Shard], states: list[Shard], dim: int, bound: float, seed: int) -> None:
        self.weights, self.states, self.dim, self.bound = weights, states, dim, bound
        self.generator = torch.Generator().manual_seed(seed & (2**63 - 1))

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor) -> None:
        rows = rows.to(torch.int64).cpu()
        fresh = torch.rand((rows.numel(), self.dim), generator=self.generator) * (2 * self.bound) - self.bound
        for shard in self.weights:
            held = _held(rows, shard)
            columns = slice(shard.first_column, shard.first_column + shard.tensor.shape[1])
            values = fresh[held][:, columns].to(shard.tensor.device, shard.tensor.dtype)
            shard.tensor[(rows[held] - shard.first_row).to(shard.tensor.device)] = values
        for shard in self.states:
            shard.tensor[(rows[_held(rows, shard)] - shard.first_row).to(shard.tensor.device)] = 0


def _held(rows: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Which of `rows` the shard holds (a mask)."""
    return (rows >= shard.first_row) & (rows < shard.first_row + shard.tensor.shape[0])
