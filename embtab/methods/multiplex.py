"""Feature multiplexing / Unified Embedding: many features share ONE hashed table of chunks.

Coleman et al., "Unified Embedding: Battle-Tested Feature Representations for Web-Scale ML
Systems", NeurIPS 2023 (arXiv 2305.12102); official code: TensorFlow Recommenders,
``layers/feature_multiplexing``. Every logical table that uses a `Multiplexed` spec with the same
`table` name reads the same physical ``rows x chunk_dim`` table. Logical table ``t`` takes
``chunks`` probes: probe ``j`` hashes an id with its own salt ``salt_of(t, j)`` and the output is
the concatenation of the ``chunks`` looked-up rows, so tables may have different widths
(``chunks * chunk_dim``) on one shared table. Only concatenation, as in the paper and TFRS.

Differences from TFRS: salts come from the logical table's name (so features sharing a logical
table, e.g. ``item_id`` and ``hist_item_ids``, read identical rows) instead of a feature index,
the hash is embtab's SplitMix64-based `hash_to_range` instead of SipHash64, and the shared table is
one torchrec table (torchrec's planner can shard it column- or table-wise) instead of T
round-robin sub-tables.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal, Mapping, Sequence

import torch

from embtab.checks import check_integer, is_integer
from embtab.config import EmbeddingSpec, LogicalTable
from embtab.hashing import salt_of
from embtab.methods.base import PhysicalTable, SizedSpec, TableMethod
from embtab.registry import MethodKind, register_method


@register_method(MethodKind.COMPRESSION)
@dataclass(frozen=True)
class Multiplexed(SizedSpec):
    """Hash this table's ids into the shared table `table` (``rows`` x ``chunk_dim``).

    Args:
        rows: rows of the shared table (its memory knob: ``rows * chunk_dim`` floats in all,
            whatever the number of features on it).
        chunk_dim: width of one row of the shared table; default ``dim // chunks`` (``dim`` when
            `chunks` is not given either). A multiple of 4 (fbgemm).
        chunks: probes per id, concatenated; the table's output width is ``chunks * chunk_dim``
            (default ``dim // chunk_dim``). Give a table its own `chunks` through
            ``EmbeddingSpec.table_methods`` with the same `table`, `rows` and `chunk_dim`.
        table: name of the shared physical table; specs with the same name share it.
    """

    name = "multiplex"
    size_field: ClassVar[str] = "rows"
    size_increasing: ClassVar[bool] = True
    size_scope: ClassVar[str] = "spec"

    rows: int
    chunk_dim: int | None = None
    chunks: int | None = None
    table: str = "unified"

    def shape(self, table: LogicalTable) -> tuple[int, int]:
        """``(chunks, chunk_dim)`` for `table`, after checking the parameters against its width."""
        where = f"table {table.name!r} (multiplex)"
        check_integer(self.rows, 1, f"{where}: rows")
        if not self.table:
            raise ValueError(f"{where}: the shared table name must be non-empty, got {self.table!r}")
        for field_name in ("chunk_dim", "chunks"):
            value = getattr(self, field_name)
            if value is not None and (not is_integer(value) or value < 1):
                raise ValueError(f"{where}: {field_name} must be an integer >= 1 or None, got {value!r}")
        chunks, chunk_dim = self.chunks, self.chunk_dim
        if chunk_dim is None:
            chunks = chunks or 1
            if table.dim % chunks:
                raise ValueError(
                    f"{where}: width {table.dim} does not split into chunks={chunks} equal chunks; "
                    "expected chunks dividing the width, or an explicit chunk_dim"
                )
            chunk_dim = table.dim // chunks
        elif chunks is None:
            if table.dim % chunk_dim:
                raise ValueError(
                    f"{where}: width {table.dim} is not a multiple of chunk_dim={chunk_dim}; "
                    "expected a divisor of the width, or an explicit chunks"
                )
            chunks = table.dim // chunk_dim
        if chunk_dim % 4:
            raise ValueError(
                f"{where}: chunk_dim={chunk_dim}; expected a multiple of 4 (fbgemm's fused kernels)"
            )
        return chunks, chunk_dim

    def build(self, table: LogicalTable) -> "MultiplexedMethod":
        return MultiplexedMethod(table, self)


class MultiplexedMethod(TableMethod):
    """`chunks` salted probes into the shared table, concatenated (pooling commutes)."""

    pooling_commutes = True

    def __init__(self, table: LogicalTable, spec: Multiplexed) -> None:
        super().__init__(table)
        self.chunks, self.chunk_dim = spec.shape(table)
        self.rows = spec.rows
        self.salts = [salt_of(table.name, probe) for probe in range(self.chunks)]
        self.physical_tables = (PhysicalTable(spec.table, spec.rows, self.chunk_dim),) * self.chunks
        self.max_id = None

    @property
    def out_dim(self) -> int:
        return self.chunks * self.chunk_dim

    def hashes(self) -> list[tuple[int, int]]:
        return [(self.rows, salt) for salt in self.salts]

    def remap_hashed(self, ids: torch.Tensor, hashed: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(hashed)

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=-1)


def multiplex(
    spec: EmbeddingSpec,
    rows: int,
    chunk_dim: int | None = None,
    features: Literal["all"] | Sequence[str] = "all",
    chunks: Mapping[str, int] | None = None,
    table: str = "unified",
) -> EmbeddingSpec:
    """`spec` with the tables of `features` (every one for ``"all"``) on one shared table.

    `chunk_dim` defaults to the spec's width (one probe per id). `chunks` gives some features a
    width of their own (``chunks[f] * chunk_dim``); a feature
    stands for its logical table (``hist_item_ids`` for ``item_id``'s table). Tables outside
    `features` keep their method. Example: ``multiplex(spec, rows=100_000, chunk_dim=8,
    chunks={"user_id": 4})`` puts every feature on one 100k x 8 table, 16 wide (32 for user_id).
    """
    base = Multiplexed(rows=rows, chunk_dim=chunk_dim or spec.dim, table=table)
    overrides = dict(spec.table_methods)
    table_of = {f.name: f.table_name for f in spec.features}
    for name in list(chunks or {}) + ([] if features == "all" else list(features)):
        if name not in table_of:
            raise ValueError(
                f"multiplex: unknown feature {name!r}; expected one of {sorted(table_of)}"
            )
    chosen = set(table_of.values()) if features == "all" else {table_of[f] for f in features}
    per_table_chunks = {table_of[f]: k for f, k in (chunks or {}).items()}
    for name in per_table_chunks:
        if name not in chosen:
            raise ValueError(
                f"multiplex: chunks names table {name!r}, which is not multiplexed; "
                f"expected one of {sorted(chosen)}"
            )
    method = spec.method
    if features == "all":
        method = base
        overrides = {n: m for n, m in overrides.items() if n not in chosen}
    for name in sorted(chosen):
        if name in per_table_chunks:
            overrides[name] = replace(base, chunks=per_table_chunks[name])
        elif features != "all":
            overrides[name] = base
    return EmbeddingSpec(
        features=spec.features, dim=spec.dim, method=method, table_methods=tuple(overrides.items())
    )
