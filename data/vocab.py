"""Vocabularies: raw categorical values to contiguous ids with a reserved out-of-vocabulary id.

Id 0 is the OOV id (unseen values, values under the min-count threshold, missing values); the
known values get ids ``1 .. n`` in sorted value order, so a vocabulary of n known values has
``size = n + 1`` ids. A vocabulary is saved next to the processed data it encoded, so every
split (and any later data) is encoded with the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

OOV_ID = 0


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Sorted known values of one table with their training counts.

    Attributes:
        name: the table this vocabulary encodes.
        values: the known values, sorted; value ``values[i]`` has id ``i + 1``.
        counts: how often each known value occurred where the vocabulary was built.
    """

    name: str
    values: pl.Series
    counts: pl.Series

    @property
    def size(self) -> int:
        """Number of ids, OOV included (the table cardinality)."""
        return len(self.values) + 1

    @classmethod
    def from_counts(cls, name: str, counts: pl.DataFrame, min_count: int = 1) -> "Vocabulary":
        """The non-null values of a ``(value, count)`` frame counted at least `min_count` times."""
        if min_count < 1:
            raise ValueError(f"vocabulary {name!r}: min_count must be >= 1, got {min_count}")
        kept = counts.filter(pl.col("value").is_not_null() & (pl.col("count") >= min_count))
        kept = kept.sort("value")
        return cls(name, kept["value"], kept["count"].cast(pl.Int64))

    @classmethod
    def from_values(cls, name: str, values: pl.Series, min_count: int = 1) -> "Vocabulary":
        """Build from every occurrence of a value in `values` (nulls ignored)."""
        counts = values.alias("value").value_counts(name="count")
        return cls.from_counts(name, counts, min_count)

    def encode(self, column: pl.Expr) -> pl.Expr:
        """Expression mapping raw values to ids (OOV_ID for unknown or null values)."""
        ids = pl.int_range(1, self.size, dtype=pl.Int64, eager=True)
        return column.replace_strict(self.values, ids, default=OOV_ID, return_dtype=self.dtype)

    def encode_list(self, column: pl.Expr) -> pl.Expr:
        """Expression mapping every element of a list column to its id."""
        return column.list.eval(self.encode(pl.element()))

    @property
    def dtype(self) -> pl.DataType:
        """Id dtype: Int32 when every id fits, else Int64."""
        return pl.Int32() if self.size < 2**31 else pl.Int64()

    def save(self, path: Path) -> None:
        """Write ``value, count, id`` rows to a parquet file."""
        frame = pl.DataFrame({"value": self.values, "count": self.counts})
        frame.with_columns(id=pl.int_range(1, self.size, dtype=pl.Int64)).write_parquet(path)

    @classmethod
    def load(cls, name: str, path: Path) -> "Vocabulary":
        """Read a vocabulary written by `save`, checking its ids are ``1 .. n`` in order."""
        frame = pl.read_parquet(path)
        expected = pl.int_range(1, len(frame) + 1, dtype=pl.Int64, eager=True)
        if not frame["id"].cast(pl.Int64).equals(expected.alias("id")):
            raise ValueError(f"{path}: vocabulary ids are not 1..{len(frame)} in order")
        return cls(name, frame["value"], frame["count"])
