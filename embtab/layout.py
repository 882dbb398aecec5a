"""The layout step: logical tables and their compiled methods -> physical tables, lookups, configs.

Pure bookkeeping, no tensors: which physical tables exist, in which torchrec collection ("bucket")
each logical table's ids for each physical table (a "piece") are looked up, which runs of like
tables combine in one call, and the torchrec table configs of every collection. `EmbeddingTables`
builds its collections from it; the forward pass (`embtab.forward`) reads it.

Buckets: ``pooled`` (one `EmbeddingBagCollection`, pooling in the kernel), ``per_id`` (an
`EmbeddingBagCollection` with one id per bag, pooled after the method's combine) and ``dim<D>``
(one `EmbeddingCollection` per width, for tables that serve a sequence feature).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Protocol, Sequence

from torchrec import EmbeddingBagConfig, EmbeddingConfig

from embtab.config import FeatureSpec, LogicalTable
from embtab.methods.base import PhysicalTable
from embtab.quant.precision import data_type

POOLED_BUCKET = "pooled"
PER_ID_BUCKET = "per_id"
BAG_BUCKETS: tuple[str, ...] = (POOLED_BUCKET, PER_ID_BUCKET)


class MethodLayout(Protocol):
    """What the layout reads of a compiled method (`embtab.methods.base.TableMethod`)."""

    physical_tables: tuple[PhysicalTable, ...]
    pooling_commutes: bool
    combine_uses_ids: bool
    distinct_rows: bool
    distinct_ids: bool

    def combine_signature(self) -> tuple | None: ...


@dataclass(frozen=True)
class Piece:
    """The ids of one logical table's features for one physical table (probe `probe`)."""

    table: str
    probe: int
    keys: tuple[str, ...]
    bucket: str
    physical: str


@dataclass(frozen=True)
class Layout:
    """Where every logical table's ids are looked up and how its vectors are put back together.

    Attributes:
        logical: the logical tables by name, in order of first use.
        physical: every physical table by name (a table shared by several logical tables once).
        pieces: one per (logical table, probe), in table order.
        group_of: table -> first table of its run of like tables combined in one call (tables
            combined on their own are absent).
        group_members: a run's first table -> the (table, probe) of every piece of the run.
        bucket_keys: every bucket's physical feature keys, in the order its input lists them.
        feature_order: the logical features in the order the forward pass reads them (by table).
        features: the logical features by name.
    """

    logical: dict[str, LogicalTable]
    physical: dict[str, PhysicalTable]
    pieces: tuple[Piece, ...]
    group_of: dict[str, str]
    group_members: dict[str, list[tuple[str, int]]]
    bucket_keys: dict[str, list[str]]
    feature_order: list[str]
    features: dict[str, FeatureSpec]

    def pieces_of(self, table: str) -> list[Piece]:
        return [p for p in self.pieces if p.table == table]

    def group(self, head: str) -> list[str]:
        """The tables of the run that starts at `head`, in order."""
        return [name for name, first in self.group_of.items() if first == head]

    def ungrouped(self) -> "Layout":
        """This layout with every table combined on its own (a reference for the grouped one)."""
        return replace(self, group_of={}, group_members={})

    def bag_configs(self, bucket: str) -> list[EmbeddingBagConfig]:
        """torchrec configs of the tables of a bag bucket (``pooled`` or ``per_id``)."""
        return [EmbeddingBagConfig(**kwargs) for kwargs in self._config_kwargs(bucket)]

    def sequence_configs(self, bucket: str) -> list[EmbeddingConfig]:
        """torchrec configs of the tables of a per-width ``dim<D>`` bucket."""
        return [EmbeddingConfig(**kwargs) for kwargs in self._config_kwargs(bucket)]

    def _config_kwargs(self, bucket: str) -> list[dict]:
        """What torchrec's configs of both kinds take, per physical table of `bucket`."""
        return [
            {
                "name": name,
                "num_embeddings": self.physical[name].rows,
                "embedding_dim": self.physical[name].dim,
                "feature_names": keys,
                "data_type": data_type(self.physical[name].precision),
                **self.physical[name].init_range(),
            }
            for name, keys in self._table_features(bucket).items()
        ]

    def _table_features(self, bucket: str) -> dict[str, list[str]]:
        features: dict[str, list[str]] = {}
        for piece in self.pieces:
            if piece.bucket == bucket:
                features.setdefault(piece.physical, []).extend(piece.keys)
        return features


def compile_layout(tables: Sequence[LogicalTable], methods: Mapping[str, MethodLayout]) -> Layout:
    """The layout of `tables`, each compiled into `methods[table.name]`.

    Raises:
        ValueError: two methods declare one physical table differently, a width is not a
            multiple of 4 (fbgemm's fused kernels need it), or a combine that takes the ids would
            see pooled vectors (or a combine of distinct rows would be pooled, grouped or given ids).
    """
    logical = {t.name: t for t in tables}
    physical = _physical_tables(logical, methods)
    pieces = _place_pieces(logical, methods)
    group_of = _group_tables(logical, methods, pieces)
    group_members = {
        head: [(p.table, p.probe) for p in pieces if group_of.get(p.table) == head]
        for head in dict.fromkeys(group_of.values())
    }
    buckets = list(dict.fromkeys(p.bucket for p in pieces))
    bucket_keys = {b: [k for p in pieces if p.bucket == b for k in p.keys] for b in buckets}
    features = {f.name: f for t in tables for f in t.features}
    return Layout(logical, physical, pieces, group_of, group_members, bucket_keys, list(features), features)


def _physical_tables(
    logical: Mapping[str, LogicalTable], methods: Mapping[str, MethodLayout]
) -> dict[str, PhysicalTable]:
    physical: dict[str, PhysicalTable] = {}
    for name in logical:
        for declared in methods[name].physical_tables:
            table = replace(declared, precision=logical[name].precision)
            seen = physical.setdefault(table.name, table)
            if seen != table:
                raise ValueError(
                    f"physical table {table.name!r} is declared as {seen} and as {table}"
                )
            if table.dim % 4:
                raise ValueError(
                    f"physical table {table.name!r} has width {table.dim}; fbgemm's fused "
                    "kernels need a multiple of 4"
                )
        _check_combine_inputs(name, methods[name])
    return physical


def _check_combine_inputs(name: str, method: MethodLayout) -> None:
    """A combine that takes the ids, or of distinct ids, sees them per id (not pooled); a
    combine of distinct rows runs per table, on per-id lookups, without the ids."""
    if method.combine_uses_ids and method.pooling_commutes:
        raise ValueError(
            f"table {name!r}: a combine that takes the ids needs per-id lookups "
            "(pooling_commutes False)"
        )
    if method.distinct_ids and method.pooling_commutes:
        raise ValueError(f"table {name!r}: a combine of distinct ids needs per-id lookups (pooling_commutes False)")
    if method.distinct_rows and (
        method.pooling_commutes or method.combine_uses_ids or method.combine_signature() is not None
    ):
        raise ValueError(
            f"table {name!r}: a combine of distinct rows needs per-id lookups, no ids and no "
            "combine_signature (pooling_commutes False, combine_uses_ids False, combine_signature None)"
        )


def _bucket_of(table: LogicalTable, method: MethodLayout, target: PhysicalTable) -> str:
    """Where a physical table is looked up: the pooled EBC when pooling commutes with the
    method's combine; one id per bag in the per-id EBC when it does not (pooled after the
    combine); the per-width EC when the table serves a sequence feature."""
    if any(f.is_sequence for f in table.features):
        return f"dim{target.dim}"
    return POOLED_BUCKET if method.pooling_commutes else PER_ID_BUCKET


def _place_pieces(logical: Mapping[str, LogicalTable], methods: Mapping[str, MethodLayout]) -> tuple[Piece, ...]:
    """A physical table shared by several logical tables (multiplexing) is looked up the way
    its most demanding user needs: per id in an EC, else one id per bag, else pooled."""
    rank = {POOLED_BUCKET: 0, PER_ID_BUCKET: 1}
    buckets: dict[str, str] = {}
    for table in logical.values():
        for target in methods[table.name].physical_tables:
            bucket = _bucket_of(table, methods[table.name], target)
            seen = buckets.setdefault(target.name, bucket)
            if rank.get(bucket, 2) > rank.get(seen, 2):
                buckets[target.name] = bucket
    pieces = []
    for table in logical.values():
        physical = methods[table.name].physical_tables
        for probe, target in enumerate(physical):
            keys = tuple(physical_key(f.name, probe, len(physical)) for f in table.features)
            pieces.append(Piece(table.name, probe, keys, buckets[target.name], target.name))
    return tuple(pieces)


def _group_key(
    name: str,
    logical: Mapping[str, LogicalTable],
    methods: Mapping[str, MethodLayout],
    pieces: Sequence[Piece],
) -> tuple | None:
    """Tables with equal keys combine in one call on their stacked columns: bag lookups only,
    the same combine, sum pooling, physical tables of one width that no table of another
    combine reads (one shared array, as ROBE's, may serve the whole run)."""
    method, table = methods[name], logical[name]
    signature = method.combine_signature()
    own_pieces = [p for p in pieces if p.table == name]
    buckets = {p.bucket for p in own_pieces}
    widths = {t.dim for t in method.physical_tables}
    others = {
        t.name
        for n in logical
        if n != name and methods[n].combine_signature() != signature
        for t in methods[n].physical_tables
    }
    own = not others & {t.name for t in method.physical_tables}
    if signature is None or len(buckets) != 1 or len(widths) != 1 or not own:
        return None
    if buckets - set(BAG_BUCKETS) or any(f.pooling != "sum" for f in table.features):
        return None
    return (signature, method.distinct_ids, *buckets, len(table.features), len(own_pieces), *widths)


def _group_tables(
    logical: Mapping[str, LogicalTable], methods: Mapping[str, MethodLayout], pieces: Sequence[Piece]
) -> dict[str, str]:
    """Runs of consecutive tables with one group key: table -> the run's first table."""
    group_of: dict[str, str] = {}
    run: list[str] = []
    keys = {name: _group_key(name, logical, methods, pieces) for name in logical}
    for name in [*logical, None]:
        if run and (name is None or keys[name] is None or keys[name] != keys[run[0]]):
            if len(run) > 1:
                group_of.update({member: run[0] for member in run})
            run = []
        if name is not None and keys[name] is not None:
            run.append(name)
    return group_of


def physical_key(feature: str, probe: int, probes: int) -> str:
    """Name of a logical feature's ids for one physical table (the feature's own name if only one)."""
    return feature if probes == 1 else f"{feature}@{probe}"
