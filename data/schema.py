"""Declared schemas of tabular CTR data files, loadable from TOML.

Example ``schema.toml`` (a folder holding it and its data files is a dataset `load_dataset`
reads)::

    name = "clicks"
    format = "csv"            # csv | tsv | parquet
    files = ["clicks.csv"]    # relative to the schema's folder; split at random 80/10/10
    split = [0.8, 0.1, 0.1]
    seed = 0
    quote_char = ""           # no quoting ('"' by default)

    [[columns]]
    name = "user_id"
    kind = "categorical"      # categorical | multi_hot | sequence | dense | label
    min_count = 2             # rarer values (in the training split) map to the OOV id 0

    [[columns]]
    name = "item_id"
    kind = "categorical"

    [[columns]]
    name = "hist_item_ids"
    kind = "sequence"         # "|"-separated ids, most recent last
    table = "item_id"         # shares item_id's vocabulary and embedding table

    [[columns]]
    name = "price"
    kind = "dense"
    transform = "log1p"

    [[columns]]
    name = "clicked"
    kind = "label"
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Mapping

import tomllib

from embtab.checks import check_field_types, check_keys

Kind = Literal["categorical", "multi_hot", "sequence", "dense", "label"]
KINDS: tuple[str, ...] = ("categorical", "multi_hot", "sequence", "dense", "label")
SPARSE_KINDS: tuple[str, ...] = ("categorical", "multi_hot", "sequence")
FORMATS: tuple[str, ...] = ("csv", "tsv", "parquet")
TRANSFORMS: dict[str, tuple[str, ...]] = {
    "none": KINDS,
    "log1p": ("dense",),
    "hour_of_day": ("categorical",),
    "weekday": ("categorical",),
}


@dataclass(frozen=True)
class ColumnSpec:
    """One column of a dataset.

    Args:
        name: the feature's name in batches.
        kind: ``categorical`` (one id per row), ``multi_hot`` (a bag of ids, pooled),
            ``sequence`` (ordered ids, not pooled), ``dense`` (a float) or ``label`` (0 or 1).
        source: the column in the file (default: `name`).
        separator: separator of the ids inside a multi-hot or sequence text field.
        min_count: values seen fewer times in the training split map to the OOV id.
        table: the sparse feature whose vocabulary and table this one shares.
        transform: ``log1p`` (dense: ``log(1 + x)`` for ``x > 0``, else 0), ``hour_of_day`` or
            ``weekday`` (categorical: derived from a ``YYMMDDHH`` timestamp), or ``none``.
    """

    name: str
    kind: Kind
    source: str | None = None
    separator: str = "|"
    min_count: int = 1
    table: str | None = None
    transform: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"column {self.name!r}: kind {self.kind!r}, expected one of {KINDS}")
        check_field_types(self, f"column {self.name!r}")
        if self.kind not in TRANSFORMS.get(self.transform, ()):
            allowed = [t for t, kinds in TRANSFORMS.items() if self.kind in kinds]
            raise ValueError(
                f"column {self.name!r}: transform {self.transform!r} for kind {self.kind!r}, "
                f"expected one of {allowed}"
            )
        if self.table is not None and self.kind not in SPARSE_KINDS:
            raise ValueError(
                f"column {self.name!r}: only sparse columns share tables, got kind {self.kind!r}"
            )
        if self.min_count < 1:
            raise ValueError(f"column {self.name!r}: min_count must be >= 1, got {self.min_count}")

    @property
    def column(self) -> str:
        """Name of the column in the source file."""
        return self.source or self.name

    @property
    def is_sparse(self) -> bool:
        return self.kind in SPARSE_KINDS

    @property
    def is_list(self) -> bool:
        return self.kind in ("multi_hot", "sequence")

    @property
    def table_name(self) -> str:
        return self.table or self.name


@dataclass(frozen=True)
class Schema:
    """A dataset's files and columns.

    Args:
        name: dataset name.
        columns: the columns to read; exactly one must be the label.
        format: ``csv``, ``tsv`` or ``parquet``.
        separator: field separator of text files (default ``,`` for csv, tab for tsv).
        has_header: whether text files start with a header naming their columns.
        column_names: for headerless text files, the names of all columns in file order.
        quote_char: quote character of text files (None or "": no quoting).
        split: train, validation and test fractions of the seeded random split.
        seed: seed of the random split.
        files: data files, relative to the schema's folder when loaded from TOML.
    """

    name: str
    columns: tuple[ColumnSpec, ...]
    format: str = "csv"
    separator: str | None = None
    has_header: bool = True
    column_names: tuple[str, ...] = ()
    quote_char: str | None = '"'
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("columns", "column_names", "split", "files"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "quote_char", self.quote_char or None)
        check_field_types(self, f"schema {self.name!r}")
        if not self.name:
            raise ValueError("schema: name must be a non-empty string")
        if self.format not in FORMATS:
            raise ValueError(
                f"schema {self.name!r}: format {self.format!r}, expected one of {FORMATS}"
            )
        if len(self.split) != 3 or min(self.split) < 0 or abs(sum(self.split) - 1) > 1e-9:
            raise ValueError(
                f"schema {self.name!r}: split {self.split}, expected 3 non-negative fractions "
                f"summing to 1"
            )
        self._check_columns()

    def _check_columns(self) -> None:
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise ValueError(f"schema {self.name!r}: duplicate column names in {names}")
        labels = [c.name for c in self.columns if c.kind == "label"]
        if len(labels) != 1:
            raise ValueError(
                f"schema {self.name!r}: expected exactly one label column, got {labels}"
            )
        sparse = {c.name: c for c in self.columns if c.is_sparse}
        for column in self.columns:
            owner = sparse.get(column.table) if column.table else column
            if owner is None or owner.table is not None:
                raise ValueError(
                    f"schema {self.name!r}: column {column.name!r} shares table {column.table!r}; "
                    f"expected a sparse column that owns its table, one of "
                    f"{sorted(n for n, c in sparse.items() if c.table is None)}"
                )
        if not self.has_header and self.format != "parquet":
            missing = sorted({c.column for c in self.columns} - set(self.column_names))
            if missing:
                raise ValueError(
                    f"schema {self.name!r}: headerless files need column_names naming every "
                    f"column; missing {missing}"
                )

    @property
    def field_separator(self) -> str:
        """Separator of text files."""
        return self.separator or ("\t" if self.format == "tsv" else ",")

    @property
    def label(self) -> ColumnSpec:
        return next(c for c in self.columns if c.kind == "label")

    @property
    def sparse(self) -> tuple[ColumnSpec, ...]:
        return tuple(c for c in self.columns if c.is_sparse)

    @property
    def dense(self) -> tuple[ColumnSpec, ...]:
        return tuple(c for c in self.columns if c.kind == "dense")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for cache keys and TOML round trips)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["columns"] = [{f.name: getattr(c, f.name) for f in fields(c)} for c in self.columns]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Schema":
        """Build from plain data such as a parsed TOML document."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"schema: unknown keys {unknown}, expected some of {sorted(known)}")
        for column in data.get("columns", ()):
            check_keys(column, [f.name for f in fields(ColumnSpec)], f"schema column {column.get('name')!r}")
        columns = tuple(ColumnSpec(**c) for c in data.get("columns", ()))
        return cls(**{**data, "columns": columns})

    @classmethod
    def from_toml(cls, path: str | Path) -> "Schema":
        """Read a schema from a TOML file."""
        with open(path, "rb") as f:
            try:
                return cls.from_dict(tomllib.load(f))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}: invalid schema: {err}") from err
