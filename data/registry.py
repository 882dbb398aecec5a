"""`load_dataset`: one entry point naming any dataset by a short string."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from data.avazu import load_avazu
from data.batch import DatasetSplits
from data.criteo import load_criteo
from data.movielens import load_movielens_1m, load_movielens_100k
from data.reader import read_schema_dir
from data.synthetic import make_synthetic
from embtab.checks import check_call

NAMES = ("movielens", "movielens-100k", "movielens-1m:<path>", "criteo:<path>", "avazu:<path>",
         "synthetic", "<folder with schema.toml>")  # fmt: skip


def load_dataset(name_or_path: str, **kwargs: Any) -> DatasetSplits:
    """Load a dataset by name; `kwargs` go to its loader.

    ``movielens`` / ``movielens-100k[:<path>]`` (offline copy without a path),
    ``movielens-1m:<path>``, ``criteo:<path>``, ``avazu:<path>``, ``synthetic`` (kwargs of
    `make_synthetic`; ``num_samples`` defaults to 100,000), or a folder holding ``schema.toml``.
    Unknown or ill-typed `kwargs` raise a ValueError naming the key, before anything is read.
    """
    loader, path = loader_of(name_or_path)
    check_call(loader, kwargs, f"[data] of {name_or_path!r}")
    name = name_or_path.partition(":")[0]
    if name in ("movielens", "movielens-100k"):
        return load_movielens_100k(path or kwargs.pop("path", None), **kwargs)
    if name == "synthetic" and not path:
        return make_synthetic(**{"num_samples": 100_000, **kwargs})
    return loader(path, **kwargs)


def loader_of(name_or_path: str) -> tuple[Callable[..., DatasetSplits], str]:
    """The loader function of a dataset name, and the path the name carries ("" if none)."""
    name, _, path = name_or_path.partition(":")
    if name in ("movielens", "movielens-100k"):
        return load_movielens_100k, path
    if name == "synthetic" and not path:
        return make_synthetic, ""
    loaders = {"movielens-1m": load_movielens_1m, "criteo": load_criteo, "avazu": load_avazu}
    if name in loaders and path:
        return loaders[name], path
    if (Path(name_or_path) / "schema.toml").is_file():
        return read_schema_dir, name_or_path
    raise ValueError(f"unknown dataset {name_or_path!r}; expected one of {NAMES}")
