"""Shared fixtures: the offline MovieLens-100K copy, downloaded once into the data cache.

OpenMP's wait policy is set first, before anything imports torch (see embtab/_threads.py).
"""

from __future__ import annotations

from embtab._threads import prefer_passive_openmp

prefer_passive_openmp()

import shutil
from pathlib import Path

import pytest

from data.movielens import MovieLensTables, ensure_movielens_100k, read_recbole_100k


@pytest.fixture(scope="session")
def movielens_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh data-cache root whose ``ml-100k`` holds the RecBole files (copied from the
    user's data cache, downloaded there on first use), so processed caches start empty."""
    root = tmp_path_factory.mktemp("embtab-data")
    shutil.copytree(ensure_movielens_100k(), root / "ml-100k")
    return root


@pytest.fixture(scope="session")
def movielens_tables(movielens_root: Path) -> MovieLensTables:
    return read_recbole_100k(movielens_root / "ml-100k")


@pytest.fixture
def one_thread():
    """Tiny batches: one intra-op thread is faster, and robust on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
