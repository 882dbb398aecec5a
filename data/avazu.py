"""Avazu click-through data (Kaggle ``train`` CSV).

Format: comma separated with the header ``id,click,hour,C1,banner_pos,site_id,site_domain,
site_category,app_id,app_domain,app_category,device_id,device_ip,device_model,device_type,
device_conn_type,C14,...,C21``. The label is ``click``; ``id`` is dropped; ``hour``
(``YYMMDDHH``) becomes two categorical features, ``hour_of_day`` and ``weekday``; every other
column is categorical. Rows are split at random (seeded) 80/10/10 by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from data.batch import DatasetSplits
from data.reader import read_dataset
from data.schema import ColumnSpec, Schema

CATEGORICAL: tuple[str, ...] = (
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
    "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    *[f"C{i}" for i in range(14, 22)],
)  # fmt: skip
HEADER: tuple[str, ...] = ("id", "click", "hour", *CATEGORICAL)


def avazu_schema(
    split: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, min_count: int = 1
) -> Schema:
    """The declared schema of the Avazu CSV."""
    columns = (
        ColumnSpec("click", "label"),
        ColumnSpec("hour_of_day", "categorical", source="hour", transform="hour_of_day"),
        ColumnSpec("weekday", "categorical", source="hour", transform="weekday"),
        *[ColumnSpec(name, "categorical", min_count=min_count) for name in CATEGORICAL],
    )
    return Schema(
        name="avazu", columns=columns, format="csv", quote_char=None, split=tuple(split), seed=seed
    )


def load_avazu(
    path: str | Path,
    cache_dir: str | Path | None = None,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    min_count: int = 1,
) -> DatasetSplits:
    """Avazu from `path` (the ``train`` CSV or a folder holding ``train.csv``) as encoded splits."""
    file = Path(path) / "train.csv" if Path(path).is_dir() else Path(path)
    return read_dataset(avazu_schema(split, seed, min_count), [file], cache_dir)
