"""What every compression method provides: remap, physical tables, combine, bytes; and the
capabilities a method may declare on top.

A method spec (a frozen dataclass, subclass of `embtab.config.MethodSpec`) is compiled for one
logical table into a `TableMethod`. `embtab.EmbeddingTables` then places every method's physical
tables in one fused torchrec collection and calls `remap` before and `combine` after the lookup.

Capabilities are declared by subclassing, and the library asks ``isinstance``:

- `SizedSpec`: bytes are set by one integer knob (`size_field`), growing or shrinking with it;
  `embtab.budget` solves the knob for a byte budget.
- `LearnedSizeSpec`: the exported size is learned (a trained mask); a budget becomes the export's
  target (`with_budget`), and `floor_method` is the smallest export.
- `MaskedMethod`: a compiled method whose mask `embtab.search.export` scores and shifts.
- `BoundAfterFusing`: a compiled method that needs the fused tables (their weights, optimizer
  state, process group); `embtab.fuse` calls `bind_fused` on it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence, TypeVar

import torch
from torch import nn

from embtab.config import LogicalTable, MethodSpec
from embtab.hashing import hash_to_range

if TYPE_CHECKING:
    from embtab.fused_state import FusedTables

SizedT = TypeVar("SizedT", bound="SizedSpec")
LearnedT = TypeVar("LearnedT", bound="LearnedSizeSpec")


@dataclass(frozen=True)
class PhysicalTable:
    """A table that is really allocated: `rows` x `dim` weights in the fused collection, stored at
    `precision` (``"fp32"``, ``"fp16"``; the collection sets it from the logical table's spec).

    Methods that share one physical table across logical tables (feature multiplexing) give it the
    same `name`; the collection allocates it once. `init` is the uniform initialization range
    (torchrec's default, U(-sqrt(1/rows), sqrt(1/rows)), when None); `init_std` instead draws
    every weight from N(0, init_std**2) (TT-Rec's Gaussian cores).
    """

    name: str
    rows: int
    dim: int
    init: tuple[float, float] | None = None
    precision: str = "fp32"
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
            method combines per id (``pooling_commutes = False``); a run of its tables combines
            in one call of `grouped` when it declares a `combine_signature`.
        distinct_rows: the forward pass looks each physical row of the batch up once, not once
            per id, and combines through `combine_rows` (each probe's distinct rows and where
            every id's row is among them): for a per-id method whose probes have far fewer
            distinct rows than the batch has ids (TT-Rec's cores). The fused optimizer then sees
            one gradient per row, the sum over its ids, as it does per id.
        distinct_ids: a per-id method whose vector of an id depends on the id alone (not on the
            rest of the batch: no batch statistics, no counts); the forward pass then remaps,
            looks up and combines each distinct id of a table once per batch and copies its
            vector to every occurrence (ROBE).
        max_id: ids must be below this (the full table); ``None`` accepts any non-negative id.
    """

    pooling_commutes: bool = True
    combine_uses_ids: bool = False
    distinct_rows: bool = False
    distinct_ids: bool = False

    def __init__(self, table: LogicalTable) -> None:
        super().__init__()
        self.table = table
        self.physical_tables: tuple[PhysicalTable, ...] = ()
        self.max_id: int | None = table.cardinality

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

    def combine_rows(self, rows: list[torch.Tensor], index: list[torch.Tensor]) -> torch.Tensor:
        """The vectors ``[n, out_dim]`` of n ids from each probe's distinct rows ``rows[p]``
        ``[u_p, dim_p]``, id i's row of probe p being ``rows[p][index[p][i]]`` (`distinct_rows`);
        by default `combine` of the rows expanded per id."""
        return self.combine([r.index_select(0, i) for r, i in zip(rows, index)])

    def combine_signature(self) -> tuple | None:
        """Tables whose methods return equal signatures may be combined in one call on stacked
        vectors ``[..., tables, features, dim]`` (`combine` must then not depend on the table);
        None (the default) combines this table on its own."""
        return None

    def grouped(self, members: Sequence["TableMethod"]) -> "TableMethod | RunCombiner":
        """What combines a run of like tables (`members`, this one first, equal signatures) in
        one call on vectors stacked ``[..., tables, features, dim]``: this method itself when its
        combine does not depend on the table (the default); a method whose combine depends on
        the table (its salts, codebook) and takes the ids (`combine_uses_ids`) returns a
        `RunCombiner` of the run's."""
        return self

    def extra_bytes(self) -> int:
        """Bytes of the method's own parameters and buffers (projections, importance weights)."""
        tensors = list(self.parameters()) + list(self.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)


class RunCombiner(Protocol):
    """Combines a run of like tables in one call (`TableMethod.grouped`) from the ids
    ``[rows, tables, features]`` and the run's looked-up rows as one block ``[rows, tables,
    probes, features, width]`` (a view of the fused lookup's output: a combine that reads
    several probes of an id together takes them side by side without a copy)."""

    def combine(self, block: torch.Tensor, ids: torch.Tensor) -> torch.Tensor: ...


class SizedSpec(MethodSpec):
    """A method whose bytes are set by one integer knob.

    Attributes:
        size_field: name of the knob (a dataclass field of the spec).
        size_increasing: True when bytes grow with the knob (rows of a hashed table), False when
            they shrink (QR's collisions).
        size_scope: "table" when the knob sizes each table on its own (hashed rows, collisions:
            `embtab.budget` solves one compression ratio and sizes every table from it), "spec"
            when one value sizes the whole configuration at once (one shared table, one base width).
    """

    size_field: ClassVar[str] = ""
    size_increasing: ClassVar[bool] = True
    size_scope: ClassVar[str] = "table"

    def with_size(self: SizedT, value: int) -> SizedT:
        """This spec with its knob set to `value`."""
        return replace(self, **{type(self).size_field: value})


class LearnedSizeSpec(MethodSpec, ABC):
    """A method whose exported size is learned: trained with a mask, then pruned to a target.

    Attributes:
        budget_field: name of the field that holds the export's byte target (0: none).
        budget_bytes: the export's byte target.
        budget_optimizer: the sparse optimizer whose state the target counts ("" for weights only).
    """

    budget_field: ClassVar[str] = "budget_bytes"
    budget_bytes: int
    budget_optimizer: str
    floor_description: ClassVar[str] = "no row kept"

    @abstractmethod
    def floor_method(self) -> MethodSpec:
        """The smallest export (`floor_description`: no row kept, the narrowest width)."""

    def with_budget(self: LearnedT, budget_bytes: int, optimizer_kind: str) -> LearnedT:
        """This spec asking its export to fit `budget_bytes` counted under `optimizer_kind`."""
        target = {type(self).budget_field: budget_bytes, "budget_optimizer": optimizer_kind}
        return replace(self, **target)


class MaskedMethod(TableMethod, ABC):
    """A compiled method with a learned mask that `embtab.search.export` reads and moves.

    Attributes:
        shift: a scalar buffer raised on top of the learned thresholds: a row or element survives
            when its score exceeds it.
    """

    shift: torch.Tensor

    @abstractmethod
    def scores(self, weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) scores from the physical tables' `weights`: at a shift ``s`` a row
        (column) survives when its score exceeds ``s``."""


class BoundAfterFusing(TableMethod, ABC):
    """A compiled method that holds on to the fused tables: `embtab.fuse` calls `bind_fused`
    with the stored tables of its collection and the process group once the tables are fused."""

    @abstractmethod
    def bind_fused(self, fused: "FusedTables") -> None:
        """Bind what the method needs of the fused tables (views of weights and optimizer state)."""
