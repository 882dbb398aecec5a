"""Generic reader of CSV/TSV/parquet CTR data with a declared `Schema`.

Pipeline (all polars lazy scans; every pass streams the files):

1. check each file: its header names every declared column and every line has the expected
   number of fields (polars itself silently pads short lines with nulls);
2. validate values: labels are 0 or 1, dense values are finite numbers, ``YYMMDDHH`` timestamps
   parse; the first bad value is reported with its file, line and column;
3. split the rows at random (seeded, exact fractions, 80/10/10 by default);
4. count sparse values on the training split and keep those seen `min_count` times per table;
5. encode (ids ``1..n``, 0 for OOV) and cache the result as parquet next to its vocabularies.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from data.batch import DatasetSplits
from data.cache import SPLITS, Processed, cache_key, data_root, entry_dir, fingerprint, load_or_build
from data.schema import ColumnSpec, Schema
from data.vocab import Vocabulary
from embtab.config import FeatureSpec

SPLIT_COLUMN = "__split"
HOUR_PATTERN = r"^\d{8}$"
EXPECTED = {
    "label": "0 or 1",
    "dense": "a finite number or empty",
    "hour_of_day": "a YYMMDDHH timestamp",
    "weekday": "a YYMMDDHH timestamp",
}


def read_dataset(
    schema: Schema, files: Sequence[str | Path], cache_dir: str | Path | None = None
) -> DatasetSplits:
    """Read, split, encode and cache `files` as declared by `schema`.

    The processed splits and vocabularies are cached under ``<cache_dir>/processed`` (default
    root: `data_root()`), keyed by the schema and the files' names, sizes and mtimes.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError(f"schema {schema.name!r}: no data files given")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: data file of {schema.name!r} not found")
    key = cache_key(dataset=schema.name, schema=schema.to_dict(), sources=fingerprint(paths))
    root = Path(cache_dir) if cache_dir is not None else data_root()
    return load_or_build(entry_dir(root, schema.name, key), key, lambda: process(schema, paths)).splits()


def read_schema_dir(path: str | Path, cache_dir: str | Path | None = None) -> DatasetSplits:
    """Read a folder holding ``schema.toml`` and the data files it lists."""
    folder = Path(path)
    schema = Schema.from_toml(folder / "schema.toml")
    if not schema.files:
        raise ValueError(
            f"{folder / 'schema.toml'}: 'files' is empty; expected the data file names"
        )
    return read_dataset(schema, [folder / f for f in schema.files], cache_dir)


def process(schema: Schema, paths: Sequence[Path]) -> Processed:
    """Validate, split, build vocabularies and encode; no caching."""
    scans = [_scan_checked(schema, path) for path in paths]
    rows = sum(n for _, n in scans)
    codes = split_codes(rows, schema.split, schema.seed)
    _check_splits(schema, paths, codes)
    raw = pl.concat([lf for lf, _ in scans], how="vertical")
    dtypes = raw.collect_schema()
    prepared = raw.select(
        [_prepare(c, dtypes[c.column]) for c in schema.columns]
        + [pl.lit(pl.Series(SPLIT_COLUMN, codes))]
    )
    vocabs = _build_vocabs(schema, prepared, str(paths[0]))
    encoded = _collect(prepared.select(_encoders(schema, vocabs)), str(paths[0]))
    frames = {
        split: encoded.filter(pl.col(SPLIT_COLUMN) == i).drop(SPLIT_COLUMN)
        for i, split in enumerate(SPLITS)
    }
    dense = tuple(c.name for c in schema.dense)
    features = feature_specs(schema, vocabs)
    return Processed(schema.name, features, dense, schema.label.name, frames, (*vocabs.values(),))


def _check_splits(schema: Schema, paths: Sequence[Path], codes: np.ndarray) -> None:
    """Every split given a share must get rows: an empty file or split would only fail after
    training (a split of fraction 0 is asked to be empty)."""
    sizes = np.bincount(codes, minlength=len(SPLITS))
    if not len(codes):
        raise ValueError(f"{', '.join(map(str, paths))}: no data rows; expected at least one row per split")
    empty = [split for split, size, share in zip(SPLITS, sizes, schema.split) if size == 0 and share > 0]
    if empty:
        raise ValueError(
            f"schema {schema.name!r}: {len(codes)} rows split {list(schema.split)} leave the {empty} "
            f"split(s) empty; expected rows in every split (more rows, or other split fractions)"
        )


def feature_specs(schema: Schema, vocabs: dict[str, Vocabulary]) -> tuple[FeatureSpec, ...]:
    """The sparse columns as features: cardinality = their table's vocabulary size (OOV
    included); categorical features carry exactly one id per sample (``required``)."""
    return tuple(
        FeatureSpec(
            c.name,
            vocabs[c.table_name].size,
            pooling="none" if c.kind == "sequence" else "sum",
            table=c.table,
            required=c.kind == "categorical",
        )
        for c in schema.sparse
    )


def split_codes(rows: int, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Split of every row (0 train, 1 valid, 2 test): a seeded permutation cut at the fractions.

    The first ``round(rows * train)`` rows of the permutation train, the next
    ``round(rows * (train + valid)) - round(rows * train)`` validate, the rest test.
    """
    order = np.random.default_rng(seed).permutation(rows)
    n_train = round(rows * fractions[0])
    n_seen = round(rows * (fractions[0] + fractions[1]))
    codes = np.full(rows, 2, dtype=np.int8)
    codes[order[:n_train]] = 0
    codes[order[n_train:n_seen]] = 1
    return codes


def _collect(lf: pl.LazyFrame, where: str) -> pl.DataFrame:
    """Collect with the streaming engine; polars errors become ValueErrors naming `where`."""
    try:
        return lf.collect(engine="streaming")
    except pl.exceptions.PolarsError as err:
        raise ValueError(f"{where}: {err}") from err


def _scan_checked(schema: Schema, path: Path) -> tuple[pl.LazyFrame, int]:
    """A lazy scan of the declared columns of `path` (checked and validated) and its row count."""
    if schema.format == "parquet":
        lf = pl.scan_parquet(path, glob=False)
        first_line = 0
    else:
        names = _text_columns(schema, path)
        rows = _check_lines(schema, path, len(names))
        lf = pl.scan_csv(
            path,
            has_header=schema.has_header,
            separator=schema.field_separator,
            quote_char=schema.quote_char,
            schema={n: pl.String for n in names},
            n_rows=rows,
            glob=False,
        )
        first_line = 2 if schema.has_header else 1
    found = lf.collect_schema().names()
    _require_columns(path, [c.column for c in schema.columns], found)
    lf = lf.select(list(dict.fromkeys(c.column for c in schema.columns)))
    return lf, _validate(schema, lf, path, first_line)


def _require_columns(path: Path, required: Sequence[str], found: Sequence[str]) -> None:
    missing = [c for c in dict.fromkeys(required) if c not in found]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; found columns {list(found)}")


def _text_columns(schema: Schema, path: Path) -> list[str]:
    """Column names of a text file: its header, or the schema's `column_names`."""
    if not schema.has_header:
        return list(schema.column_names)
    header = pl.scan_csv(
        path,
        separator=schema.field_separator,
        quote_char=schema.quote_char,
        infer_schema=False,
        n_rows=0,
        glob=False,
    )
    try:
        return header.collect_schema().names()
    except pl.exceptions.PolarsError as err:
        raise ValueError(f"{path}: cannot read the header: {err}") from err


def _check_lines(schema: Schema, path: Path, expected: int) -> int:
    """The number of data rows of `path` (blank lines at its end are not rows); ValueError at
    the first line that is not UTF-8, is blank before the end, or does not have `expected`
    fields."""
    sep = schema.field_separator
    line = pl.col("text")
    if schema.quote_char:
        q = re.escape(schema.quote_char)
        line = line.str.replace_all(f"{q}[^{q}]*{q}", "")
    count = line.str.count_matches(sep, literal=True) + 1
    blank = pl.col("text").is_null()
    first_data = 1 if schema.has_header else 0
    wrong = (count != expected) & ~blank & (pl.col("row") >= first_data)
    not_utf8 = pl.col("text").str.contains("\ufffd", literal=True)
    lines = scan_lines(path).with_row_index("row")
    found = _collect(
        lines.select(
            last=pl.col("row").filter(~blank).max(),
            blank=pl.col("row").filter(blank).first(),
            wrong=pl.col("row").filter(wrong).first(),
            not_utf8=pl.col("row").filter(not_utf8).first(),
        ),
        str(path),
    ).row(0, named=True)
    last = -1 if found["last"] is None else found["last"]
    if found["not_utf8"] is not None:
        raise ValueError(f"{path}, line {found['not_utf8'] + 1}: invalid UTF-8 bytes; expected UTF-8 text")
    if found["blank"] is not None and found["blank"] < last:
        raise ValueError(f"{path}, line {found['blank'] + 1}: blank line inside the data; expected {expected} fields")
    if found["wrong"] is not None:
        row = found["wrong"]
        text, fields = _collect(
            lines.filter(pl.col("row") == row).select("text", count.alias("fields")), str(path)
        ).row(0)
        raise ValueError(
            f"{path}, line {row + 1}: {fields} fields separated by {sep!r}, expected {expected}: "
            f"{(text or '')[:200]!r}"
        )
    return max(last + 1 - first_data, 0)


def scan_lines(source: Path | bytes) -> pl.LazyFrame:
    """Every line of a text file, unparsed, as the string column ``text`` (blank lines: null)."""
    return pl.scan_csv(
        source,
        glob=False,
        has_header=False,
        separator="\x1f",
        quote_char=None,
        schema={"text": pl.String},
        truncate_ragged_lines=True,
        encoding="utf8-lossy",
    )


def _bad_values(column: ColumnSpec) -> pl.Expr | None:
    """Expression flagging invalid raw values of `column` (None: nothing to check)."""
    raw = pl.col(column.column)
    if column.kind == "label":
        value = raw.cast(pl.Float64, strict=False)
        return value.is_null() | ~value.is_in([0.0, 1.0])
    if column.kind == "dense":
        value = raw.cast(pl.Float64, strict=False)
        return raw.is_not_null() & (value.is_null() | ~value.is_finite())
    if column.transform in ("hour_of_day", "weekday"):
        text = raw.cast(pl.String)
        date = text.str.slice(0, 6).str.to_date("%y%m%d", strict=False)
        hour = text.str.slice(6, 2).cast(pl.Int32, strict=False)
        valid = text.str.contains(HOUR_PATTERN) & date.is_not_null() & (hour < 24)
        return ~valid.fill_null(False)
    return None


def _validate(schema: Schema, lf: pl.LazyFrame, path: Path, first_line: int) -> int:
    """Row count of `lf`; ValueError naming the first invalid value of any checked column."""
    checks = [(c, _bad_values(c)) for c in schema.columns]
    checks = [(c, bad) for c, bad in checks if bad is not None]
    exprs = [pl.len().alias("rows")]
    for i, (column, bad) in enumerate(checks):
        exprs.append(pl.int_range(pl.len()).filter(bad).first().alias(f"row{i}"))
        exprs.append(pl.col(column.column).filter(bad).first().alias(f"value{i}"))
    found = _collect(lf.select(exprs), str(path)).row(0, named=True)
    for i, (column, _) in enumerate(checks):
        row = found[f"row{i}"]
        if row is not None:
            where = f"line {row + first_line}" if first_line else f"row {row}"
            expected = EXPECTED.get(column.kind) or EXPECTED[column.transform]
            raise ValueError(
                f"{path}, {where}, column {column.column!r}: value {found[f'value{i}']!r}, "
                f"expected {expected}"
            )
    return int(found["rows"])


def _prepare(column: ColumnSpec, dtype: pl.DataType) -> pl.Expr:
    """Expression turning the raw column into the feature's typed value (strings for sparse)."""
    raw = pl.col(column.column)
    if column.kind == "label":
        return raw.cast(pl.Float32).alias(column.name)
    if column.kind == "dense":
        value = raw.cast(pl.Float64)
        if column.transform == "log1p":
            value = pl.when(value > 0).then(value.log1p()).otherwise(0.0)
        return value.fill_null(0.0).cast(pl.Float32).alias(column.name)
    if column.is_list:
        if isinstance(dtype, pl.List):
            empty = pl.lit([], pl.List(pl.String))
            items = raw.list.eval(pl.element().cast(pl.String)).fill_null(empty)
        else:
            items = raw.cast(pl.String).fill_null("").str.split(column.separator)
        return items.list.eval(pl.element().filter(pl.element() != "")).alias(column.name)
    text = raw.cast(pl.String)
    if column.transform == "hour_of_day":
        text = text.str.slice(6, 2)
    elif column.transform == "weekday":
        text = text.str.slice(0, 6).str.to_date("%y%m%d").dt.weekday().cast(pl.String)
    return text.alias(column.name)


def _build_vocabs(schema: Schema, prepared: pl.LazyFrame, where: str) -> dict[str, Vocabulary]:
    """One vocabulary per table from the training split's value counts."""
    train = prepared.filter(pl.col(SPLIT_COLUMN) == 0)
    owners = [c for c in schema.sparse if c.table is None]
    queries = []
    for owner in owners:
        members = [c for c in schema.sparse if c.table_name == owner.name]
        values = [
            train.select((pl.col(c.name).explode() if c.is_list else pl.col(c.name)).alias("value"))
            for c in members
        ]
        queries.append(pl.concat(values).group_by("value").agg(pl.len().alias("count")))
    try:
        counts = pl.collect_all(queries, engine="streaming")
    except pl.exceptions.PolarsError as err:
        raise ValueError(f"{where}: {err}") from err
    return {
        owner.name: Vocabulary.from_counts(owner.name, frame, owner.min_count)
        for owner, frame in zip(owners, counts)
    }


def _encoders(schema: Schema, vocabs: dict[str, Vocabulary]) -> list[pl.Expr]:
    """Expressions producing the encoded frame: ids, dense values, label, split code."""
    exprs = []
    for column in schema.columns:
        if column.is_sparse:
            vocab = vocabs[column.table_name]
            encode = vocab.encode_list if column.is_list else vocab.encode
            exprs.append(encode(pl.col(column.name)))
        else:
            exprs.append(pl.col(column.name))
    return exprs + [pl.col(SPLIT_COLUMN)]
