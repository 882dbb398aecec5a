"""Processed-data cache: encoded splits as parquet plus their vocabularies, written atomically.

A processed dataset lives in ``<root>/processed/<name>-<key>/`` (the name made safe for a path)
where the key hashes the dataset's name, every processing parameter and each source file's
absolute path, size, mtime and a hash of its first and last MiB, so another file, another
content or another dataset gets another entry. The entry is written into a uniquely named
temporary sibling directory and renamed into place only when complete, so concurrent builders
never see each other's partial work; an entry that fails to load (truncated file, missing
column, other key) is moved aside and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import polars as pl

from data.batch import CTRDataset, DatasetSplits
from data.vocab import Vocabulary
from embtab.config import FeatureSpec
from embtab.files import fsync_folder

CACHE_VERSION = 2  # bump whenever processing changes what an entry holds
SPLITS = ("train", "valid", "test")


def data_root() -> Path:
    """Root of embtab's data cache: ``$EMBTAB_DATA_DIR`` or ``~/.cache/embtab``."""
    return Path(os.environ.get("EMBTAB_DATA_DIR") or Path.home() / ".cache" / "embtab")


SAMPLE_BYTES = 1 << 20


def fingerprint(paths: Sequence[Path]) -> list[list[Any]]:
    """Absolute path, size, mtime and a hash of the first and last MiB of each source file:
    what the cache key depends on."""
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns, _content_hash(p)] for p in paths]


def _content_hash(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def safe_name(name: str) -> str:
    """`name` as one harmless path component: characters other than letters, digits, ``.``,
    ``_`` and ``-`` become ``_``, and it never starts with a dot."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return cleaned[:80] or "dataset"


def entry_dir(root: Path, name: str, key: str) -> Path:
    """The cache entry of dataset `name` under `key`: always inside ``<root>/processed``."""
    return Path(root) / "processed" / f"{safe_name(name)}-{key}"


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


LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, pl.exceptions.PolarsError)


def load_or_build(directory: Path, key: str, build: Callable[[], Processed]) -> Processed:
    """The cached entry in `directory` if it loads and matches `key`, else `build()` saved there.

    The new entry is written to a uniquely named temporary directory and renamed into place, so
    an error or a crash while writing never leaves a half-written entry behind, and builders
    running at the same time never disturb each other: the first rename wins and the others
    keep the (identical) entry they built. A broken entry is renamed aside before it is removed,
    so no reader ever sees it half deleted.
    """
    try:
        return Processed.load(directory, key)
    except LOAD_ERRORS:
        pass
    processed = build()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
    try:
        processed.save(tmp, key)
        _fsync_tree(tmp)
        _publish(tmp, directory, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return processed


def _publish(tmp: Path, directory: Path, key: str) -> None:
    """Rename `tmp` to `directory` unless another builder has already put a valid entry there."""
    for _ in range(3):
        try:
            os.rename(tmp, directory)
            return
        except OSError:
            try:
                Processed.load(directory, key)
                return  # another builder won the race with an equal entry
            except LOAD_ERRORS:
                aside = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex}"
                try:
                    os.rename(directory, aside)
                except FileNotFoundError:
                    continue
                shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"{directory}: could not publish the processed data (other processes keep replacing it)")


def _fsync_tree(folder: Path) -> None:
    """Make every file under `folder` durable before the folder is renamed into place."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_folder(path if path.is_dir() else path.parent)
    fsync_folder(folder)
