"""Criteo Kaggle display-advertising data (``train.txt``).

Format: tab separated, no header, 40 fields per line: the label (0/1), 13 integer features
I1..I13 (may be empty or negative) and 26 categorical features C1..C26 (8-digit hex, may be
empty). Dense features become ``log(1 + x)`` for ``x > 0`` and 0 otherwise (missing or
non-positive, as DLRM clamps negatives); categorical values seen fewer than `min_count` times in
the training split, and missing values, map to the OOV id 0. Rows are split at random (seeded)
80/10/10 by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from data.batch import DatasetSplits
from data.reader import read_dataset
from data.schema import ColumnSpec, Schema

DENSE: tuple[str, ...] = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL: tuple[str, ...] = tuple(f"C{i}" for i in range(1, 27))
COLUMNS: tuple[str, ...] = ("label", *DENSE, *CATEGORICAL)


def criteo_schema(
    split: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, min_count: int = 1
) -> Schema:
    """The declared schema of the Criteo Kaggle TSV."""
    columns = (
        ColumnSpec("label", "label"),
        *[ColumnSpec(name, "dense", transform="log1p") for name in DENSE],
        *[ColumnSpec(name, "categorical", min_count=min_count) for name in CATEGORICAL],
    )
    return Schema(
        name="criteo",
        columns=columns,
        format="tsv",
        has_header=False,
        column_names=COLUMNS,
        quote_char=None,
        split=tuple(split),
        seed=seed,
    )


def load_criteo(
    path: str | Path,
    cache_dir: str | Path | None = None,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    min_count: int = 1,
) -> DatasetSplits:
    """Criteo from `path` (``train.txt`` or a folder holding it) as cached, encoded splits."""
    file = Path(path) / "train.txt" if Path(path).is_dir() else Path(path)
    return read_dataset(criteo_schema(split, seed, min_count), [file], cache_dir)
