"""Processed-data cache: encoded splits as parquet plus their vocabularies, written atomically.

A processed dataset lives in ``<root>/processed/<name>-<key>/`` where the key hashes the source
files' names, sizes and mtimes and every processing parameter, so changing either builds a new
entry. The entry is written into a temporary sibling directory and renamed into place only when
complete; an entry that fails to load (truncated file, missing column, other key) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import polars as pl

from data.batch import CTRDataset, DatasetSplits
from data.vocab import Vocabulary
from embtab.config import FeatureSpec

CACHE_VERSION = 1  # bump whenever processing changes what an entry holds
SPLITS = ("train", "valid", "test")


def data_root() -> Path:
    """Root of embtab's data cache: ``$EMBTAB_DATA_DIR`` or ``~/.cache/embtab``."""
    return Path(os.environ.get("EMBTAB_DATA_DIR") or Path.home() / ".cache" / "embtab")


def fingerprint(paths: Sequence[Path]) -> list[list[Any]]:
    """Name, size and mtime of each source file: what the cache key depends on."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def cache_key(**parts: Any) -> str:
    """Stable 16-hex-digit hash of JSON-serializable processing parameters."""
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Processed:
    """Encoded splits of one dataset, with what is needed to turn them into `CTRDataset`s.

    Attributes:
        name: dataset name.
        features: sparse features, in batch key order.
        dense: names of the dense columns.
        label: name of the label column.
        frames: per split name (train, valid, test), the encoded frame.
        vocabs: one vocabulary per table.
    """

    name: str
    features: tuple[FeatureSpec, ...]
    dense: tuple[str, ...]
    label: str
    frames: dict[str, pl.DataFrame]
    vocabs: tuple[Vocabulary, ...]

    def splits(self) -> DatasetSplits:
        """The three splits as in-memory datasets."""
        datasets = {
            split: CTRDataset.from_frame(
                f"{self.name}/{split}", frame, self.features, self.dense, self.label
            )
            for split, frame in self.frames.items()
        }
        sizes = {v.name: v.size for v in self.vocabs}
        return DatasetSplits(name=self.name, vocab_sizes=sizes, **datasets)

    def save(self, directory: Path, key: str) -> None:
        """Write every split, vocabulary and a ``meta.json`` (last) into `directory`."""
        (directory / "vocab").mkdir(parents=True)
        for split, frame in self.frames.items():
            frame.write_parquet(directory / f"{split}.parquet")
        for vocab in self.vocabs:
            vocab.save(directory / "vocab" / f"{vocab.name}.parquet")
        meta = {
            "key": key,
            "name": self.name,
            "features": [asdict(f) for f in self.features],
            "dense": list(self.dense),
            "label": self.label,
            "rows": {split: len(frame) for split, frame in self.frames.items()},
            "vocabs": [v.name for v in self.vocabs],
        }
        (directory / "meta.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path, key: str) -> "Processed":
        """Read an entry written by `save`; ValueError when it is incomplete or for another key."""
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("key") != key:
            raise ValueError(f"{directory}: cache key {meta.get('key')!r}, expected {key!r}")
        frames = {split: pl.read_parquet(directory / f"{split}.parquet") for split in SPLITS}
        for split, frame in frames.items():
            if len(frame) != meta["rows"][split]:
                expected = meta["rows"][split]
                raise ValueError(
                    f"{directory}/{split}.parquet: {len(frame)} rows, expected {expected}"
                )
        vocabs = tuple(
            Vocabulary.load(name, directory / "vocab" / f"{name}.parquet")
            for name in meta["vocabs"]
        )
        features = tuple(FeatureSpec(**f) for f in meta["features"])
        return cls(meta["name"], features, tuple(meta["dense"]), meta["label"], frames, vocabs)


def load_or_build(directory: Path, key: str, build: Callable[[], Processed]) -> Processed:
    """The cached entry in `directory` if it loads and matches `key`, else `build()` saved there.

    The new entry is written to a temporary directory and renamed into place, so an error or a
    crash while writing never leaves a half-written entry behind.
    """
    try:
        return Processed.load(directory, key)
    except (OSError, ValueError, KeyError, TypeError, pl.exceptions.PolarsError):
        pass
    processed = build()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
    try:
        processed.save(tmp, key)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return processed
