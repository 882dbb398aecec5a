"""`EmbeddingTables`: every method's physical tables in one fused torchrec collection.

The forward pass is the three steps of DESIGN.md: remap logical ids to physical rows (per method,
vectorized), look every physical feature up at once (one `EmbeddingBagCollection` for pooled
lookups, one `EmbeddingCollection` per width for per-id lookups), combine physical vectors back into
logical ones. The collections are stock torchrec modules, so `embtab.fuse` / `DistributedModelParallel`
swaps them for fbgemm's fused kernels and shards them like any torchrec model.

This module owns the collections and the accounting; the layout (`embtab.layout`), the input
checks (`embtab.validation`) and the remap / combine steps (`embtab.forward`) live in their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingCollection, JaggedTensor, KeyedJaggedTensor, KeyedTensor

from embtab.config import EmbeddingSpec, SparseOptimizer
from embtab.forward import (
    LookupOutputs,
    PieceColumns,
    combine,
    deduplicate,
    distinct_rows,
    physical_inputs,
    remap,
    table_inputs,
    table_weights,
)
from embtab.layout import PER_ID_BUCKET, POOLED_BUCKET, Layout, compile_layout
from embtab.methods.base import PhysicalTable, TableMethod
from embtab.validation import canonical
from embtab.quant.precision import element_bytes


class EmbeddingOutput(NamedTuple):
    """What `EmbeddingTables` returns: torchrec's outputs for pooled and for sequence features."""

    pooled: KeyedTensor | None
    sequence: dict[str, JaggedTensor]


@dataclass(frozen=True)
class TableBytes:
    """Bytes of one physical table: weights at their stored precision plus its fused optimizer's state."""

    rows: int
    dim: int
    parameter_bytes: int
    optimizer_bytes: int

    @property
    def total(self) -> int:
        return self.parameter_bytes + self.optimizer_bytes


@dataclass(frozen=True)
class MemoryReport:
    """Per physical table bytes, the methods' own parameters, and the total."""

    tables: dict[str, TableBytes]
    method_bytes: int

    @property
    def parameter_bytes(self) -> int:
        return sum(t.parameter_bytes for t in self.tables.values()) + self.method_bytes

    @property
    def optimizer_bytes(self) -> int:
        return sum(t.optimizer_bytes for t in self.tables.values())

    @property
    def total(self) -> int:
        return self.parameter_bytes + self.optimizer_bytes


class EmbeddingTables(nn.Module):
    """Compressed (or full) embedding tables for every sparse feature of a model.

    Takes a `KeyedJaggedTensor` of logical ids and returns an `EmbeddingOutput`: a `KeyedTensor`
    of pooled features ``[B, sum of widths]`` and a `JaggedTensor` per sequence feature.
    Built with ``weighted=True`` it takes ids with a weight each (torchrec's weighted features)
    and pools every bag as the weighted sum of its ids' vectors.

    Example::

        spec = EmbeddingSpec(features=(FeatureSpec("user", 100), FeatureSpec("item", 50)), dim=8)
        tables = EmbeddingTables(spec)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["user", "item"], values=torch.tensor([3, 7, 1, 2]), lengths=torch.tensor([1, 1, 1, 1])
        )
        tables(kjt).pooled.values().shape  # torch.Size([2, 16])
    """

    def __init__(
        self, spec: EmbeddingSpec, device: torch.device | None = None, weighted: bool = False
    ) -> None:
        super().__init__()
        self.spec = spec
        self.weighted = weighted
        self.sparse_optimizer: SparseOptimizer | None = None
        logical = spec.tables()
        with torch.device(device or "cpu"):
            self.methods = nn.ModuleDict({t.name: t.method.build(t) for t in logical})
        self.layout = compile_layout(logical, self.table_methods)
        if weighted:
            _check_weighted(self.layout)
        self._build_collections(device)
        self._columns = PieceColumns()

    @property
    def table_methods(self) -> dict[str, TableMethod]:
        """The compiled method of every logical table, by table name."""
        return {name: method for name, method in self.methods.items() if isinstance(method, TableMethod)}

    def _build_collections(self, device: torch.device | None) -> None:
        self.ebc: EmbeddingBagCollection | None = None
        self.per_id_ebc: EmbeddingBagCollection | None = None
        self.ecs = nn.ModuleDict()
        for bucket in self.layout.bucket_keys:
            if bucket == POOLED_BUCKET:
                self.ebc = EmbeddingBagCollection(
                    tables=self.layout.bag_configs(bucket), is_weighted=self.weighted, device=device
                )
            elif bucket == PER_ID_BUCKET:
                self.per_id_ebc = EmbeddingBagCollection(tables=self.layout.bag_configs(bucket), device=device)
            else:
                self.ecs[bucket] = EmbeddingCollection(tables=self.layout.sequence_configs(bucket), device=device)

    def collections(self) -> list[nn.Module]:
        """The torchrec collections that hold the physical tables (what `embtab.fuse` shards)."""
        bags = [c for c in (self.ebc, self.per_id_ebc) if c is not None]
        return [*bags, *self.ecs.values()]

    # ----------------------------------------------------------------------------- accounting
    @property
    def physical_tables(self) -> dict[str, PhysicalTable]:
        return dict(self.layout.physical)

    @property
    def feature_names(self) -> list[str]:
        return list(self.layout.feature_order)

    def output_dim(self, feature: str) -> int:
        """Width of the vectors this module returns for `feature`."""
        return self.table_methods[self.layout.features[feature].table_name].out_dim

    def fuse_optimizer(self, optimizer: SparseOptimizer) -> None:
        """Give every table `optimizer` as torchrec's in-backward optimizer, which fbgemm fuses
        into the lookup's backward once the tables are sharded (`embtab.fuse`); `memory_bytes`
        counts its state from then on."""
        self.sparse_optimizer = optimizer
        for collection in self.collections():
            apply_optimizer_in_backward(optimizer.description.torch_class, collection.parameters(), optimizer.torch_kwargs())

    def memory_bytes(self, optimizer: SparseOptimizer | None = None) -> MemoryReport:
        """Bytes allocated for weights and optimizer state (the fused optimizer by default)."""
        optimizer = optimizer or self.sparse_optimizer
        tables = {
            name: TableBytes(
                rows=t.rows,
                dim=t.dim,
                parameter_bytes=t.rows * t.dim * element_bytes(t.precision),
                optimizer_bytes=optimizer.state_bytes(t.rows, t.dim) if optimizer else 0,
            )
            for name, t in self.layout.physical.items()
        }
        method_bytes = sum(m.extra_bytes() for m in self.table_methods.values())
        quantized = {
            p.name: p.rows
            for name, method in self.table_methods.items()
            if self.spec.low_precision.quantizes(name)
            for p in method.physical_tables
        }
        method_bytes += sum(self.spec.low_precision.state_bytes(rows) for rows in quantized.values())
        return MemoryReport(tables=tables, method_bytes=method_bytes)

    # ----------------------------------------------------------------------------- forward
    def forward(self, features: KeyedJaggedTensor) -> EmbeddingOutput:
        kjt = canonical(features, self.layout.feature_order, self.layout.features, self.weighted)
        methods = self.table_methods
        inputs = table_inputs(kjt, self.layout, methods)
        weights = table_weights(kjt, inputs) if self.weighted else {}
        reduced, occurrences = deduplicate(inputs, methods)
        remapped = remap(reduced, methods)
        distinct = distinct_rows(remapped, methods)
        looked_up = self._lookup(physical_inputs(reduced, remapped, self.layout, weights, distinct))
        pooled, sequence = combine(self.layout, methods, reduced, looked_up, kjt.stride(), distinct, occurrences)
        return EmbeddingOutput(pooled, sequence)

    def _lookup(self, inputs: dict[str, KeyedJaggedTensor]) -> LookupOutputs:
        """Every bucket's lookup: bag buckets cut into their pieces' columns."""
        bags = {POOLED_BUCKET: self.ebc, PER_ID_BUCKET: self.per_id_ebc}
        out = LookupOutputs()
        for bucket, kjt in inputs.items():
            bag = bags.get(bucket)
            if bag is not None:
                out.blocks[bucket] = self._columns.blocks(bag(kjt), bucket, self.layout)
            else:
                out.sequences[bucket] = self.ecs[bucket](kjt)
        return out


def _check_weighted(layout: Layout) -> None:
    """Per-id weights scale the rows inside the fused pooled lookup (torchrec's weighted
    features), which is exact only when the combine commutes with sum pooling."""
    for piece in layout.pieces:
        table = layout.logical[piece.table]
        unpooled = [f.name for f in table.features if f.pooling != "sum"]
        if unpooled:
            raise ValueError(
                f"table {table.name!r}: weighted ids need sum pooling; features {unpooled} are not "
                "sum-pooled"
            )
        if piece.bucket != POOLED_BUCKET:
            raise ValueError(
                f"table {table.name!r}: weighted ids need a method whose combine commutes with "
                f"pooling; {table.method} combines each id's rows before pooling"
            )
