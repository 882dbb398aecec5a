"""`load_dataset`: one entry point naming any dataset by a short string."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data.avazu import load_avazu
from data.batch import DatasetSplits
from data.criteo import load_criteo
from data.movielens import load_movielens_1m, load_movielens_100k
from data.reader import read_schema_dir
from data.synthetic import make_synthetic

NAMES = ("movielens", "movielens-100k", "movielens-1m:<path>", "criteo:<path>", "avazu:<path>",
         "synthetic", "<folder with schema.toml>")  # fmt: skip


def load_dataset(name_or_path: str, **kwargs: Any) -> DatasetSplits:
    """Load a dataset by name; `kwargs` go to its loader.

    ``movielens`` / ``movielens-100k[:<path>]`` (offline copy without a path),
    ``movielens-1m:<path>``, ``criteo:<path>``, ``avazu:<path>``, ``synthetic`` (kwargs of
    `make_synthetic`; ``num_samples`` defaults to 100,000), or a folder holding ``schema.toml``.
    """
    name, _, path = name_or_path.partition(":")
    if name in ("movielens", "movielens-100k"):
        return load_movielens_100k(path or kwargs.pop("path", None), **kwargs)
    if name == "synthetic" and not path:
        return make_synthetic(**{"num_samples": 100_000, **kwargs})
    loaders = {"movielens-1m": load_movielens_1m, "criteo": load_criteo, "avazu": load_avazu}
    if name in loaders and path:
        return loaders[name](path, **kwargs)
    if (Path(name_or_path) / "schema.toml").is_file():
        return read_schema_dir(name_or_path, **kwargs)
    raise ValueError(f"unknown dataset {name_or_path!r}; expected one of {NAMES}")
