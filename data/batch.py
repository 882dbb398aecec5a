"""In-memory columnar CTR datasets and their batches.

A `CTRDataset` keeps every column as one flat tensor: a single-id feature is a vector of ids, a
multi-hot or sequence feature is a jagged pair (values, offsets). `CTRDataset.batch` gathers any
set of rows into one `Batch` with a handful of vectorized index operations, so a `DataLoader`
never touches samples one at a time.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset
from torchrec import KeyedJaggedTensor

from embtab.config import FeatureSpec


@dataclass(frozen=True)
class Batch:
    """One mini-batch: sparse ids as a `KeyedJaggedTensor`, dense features and labels.

    Attributes:
        sparse: the dataset's sparse features, keyed in `feature_specs()` order; int64 ids.
        dense: float32 ``[B, n_dense]`` (``[B, 0]`` when the dataset has no dense feature).
        labels: float32 ``[B]``.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The same batch on `device`."""
        return Batch(
            sparse=self.sparse.to(device, non_blocking=non_blocking),
            dense=self.dense.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def jagged_gather(
    values: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `rows` of the jagged array (values, offsets): returns (gathered values, lengths).

    Vectorized: every gathered element's source position is its row's start plus its rank
    inside the row, computed with one `repeat_interleave`.
    """
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    out_starts = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    shift = torch.repeat_interleave(starts - out_starts, lengths, output_size=total)
    return values[shift + torch.arange(total, dtype=shift.dtype)], lengths


class CTRDataset(Dataset):
    """A columnar, in-memory CTR dataset whose rows are gathered into `Batch` objects.

    Args:
        name: dataset name, for messages and logs.
        features: the sparse features; single-id features have pooling ``"sum"`` and
            ``required=True``, multi-hot ``"sum"``, sequences ``"none"``.
        ids: per feature, a 1-D integer tensor of ids (all rows' ids concatenated).
        offsets: per multi-hot or sequence feature, ``[N + 1]`` row boundaries into its ids;
            a feature without offsets has exactly one id per row.
        dense: float32 ``[N, n_dense]``.
        labels: float32 ``[N]``.
        dense_names: names of the dense columns.
    """

    def __init__(
        self,
        name: str,
        features: Sequence[FeatureSpec],
        ids: Mapping[str, torch.Tensor],
        offsets: Mapping[str, torch.Tensor],
        dense: torch.Tensor,
        labels: torch.Tensor,
        dense_names: Sequence[str] = (),
    ) -> None:
        self.name = name
        self._features = tuple(features)
        self.dense = dense.to(torch.float32)
        self.labels = labels.to(torch.float32)
        self.dense_names = tuple(dense_names)
        n = len(self.labels)
        if self.dense.ndim != 2 or self.dense.shape[0] != n:
            raise ValueError(
                f"dataset {name!r}: dense must be [{n}, n_dense], got {list(dense.shape)}"
            )
        for feature in self._features:
            _check_column(name, feature, ids.get(feature.name), offsets.get(feature.name), n)
        self._jagged = {k: (ids[k], offsets[k].to(torch.int64)) for k in offsets}
        single = [f.name for f in self._features if f.name not in offsets]
        self._single_index = {name: i for i, name in enumerate(single)}
        self._single = _stack_columns([ids[k] for k in single], n)

    @property
    def dense_dim(self) -> int:
        """Number of dense features."""
        return int(self.dense.shape[1])

    def feature_specs(self) -> tuple[FeatureSpec, ...]:
        """The sparse features, in the key order of every `Batch.sparse`."""
        return self._features

    def fingerprint(self) -> str:
        """A hash of the rows in order: labels, dense values and every feature's ids (and lengths),
        so another file, seed or split gives another fingerprint."""
        digest = hashlib.sha256(str((len(self), [f.name for f in self._features])).encode())
        tensors = [self.labels, self.dense, self._single, *(t for pair in self._jagged.values() for t in pair)]
        for tensor in tensors:
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int | slice | torch.Tensor | Sequence[int]) -> Batch:
        """Rows `index` as a `Batch` (an int gives a batch of one row)."""
        if isinstance(index, slice):
            return self.batch(torch.arange(len(self))[index])
        return self.batch(torch.as_tensor(index).reshape(-1))

    def __getitems__(self, indices: torch.Tensor | Sequence[int]) -> Batch:
        """Batched fetch used by `DataLoader`: all `indices` as one `Batch`."""
        return self.batch(torch.as_tensor(indices))

    def batch(self, indices: torch.Tensor) -> Batch:
        """Gather rows `indices` into one `Batch` with vectorized (jagged) index operations."""
        rows = indices.to(torch.int64)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise IndexError(
                f"dataset {self.name!r}: row indices must lie in [0, {len(self)}), "
                f"got min {int(rows.min())}, max {int(rows.max())}"
            )
        single = self._single[rows].T
        values, lengths = [], []
        for feature in self._features:
            if feature.name in self._single_index:
                values.append(single[self._single_index[feature.name]])
                lengths.append(torch.ones(len(rows), dtype=torch.int64))
            else:
                v, n = jagged_gather(*self._jagged[feature.name], rows)
                values.append(v)
                lengths.append(n)
        sparse = KeyedJaggedTensor(
            keys=[f.name for f in self._features],
            values=torch.cat(values).to(torch.int64),
            lengths=torch.cat(lengths),
            stride=len(rows),
        )
        return Batch(sparse=sparse, dense=self.dense[rows], labels=self.labels[rows])

    @classmethod
    def from_frame(
        cls,
        name: str,
        frame: pl.DataFrame,
        features: Sequence[FeatureSpec],
        dense_names: Sequence[str],
        label: str,
    ) -> "CTRDataset":
        """Build from a processed polars frame: integer columns for single-id features, integer
        list columns for multi-hot and sequence features, float columns for dense and label."""
        ids: dict[str, torch.Tensor] = {}
        offsets: dict[str, torch.Tensor] = {}
        for feature in features:
            column = frame[feature.name]
            if isinstance(column.dtype, pl.List):
                lengths = column.list.len().cast(pl.Int64).to_numpy()
                offsets[feature.name] = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
                column = column.explode(empty_as_null=False)
            ids[feature.name] = torch.from_numpy(column.to_numpy().copy())
        dense = (
            frame.select(dense_names).to_numpy().astype(np.float32)
            if dense_names
            else np.zeros((len(frame), 0), np.float32)
        )
        return cls(
            name,
            features,
            ids,
            offsets,
            torch.from_numpy(np.ascontiguousarray(dense)),
            torch.from_numpy(frame[label].cast(pl.Float32).to_numpy().copy()),
            dense_names,
        )


def _check_column(
    dataset: str,
    feature: FeatureSpec,
    ids: torch.Tensor | None,
    offsets: torch.Tensor | None,
    rows: int,
) -> None:
    """Raise ValueError unless `ids` (split by `offsets`, if given) hold `rows` rows of ids
    inside the feature's cardinality."""
    where = f"dataset {dataset!r}, feature {feature.name!r}"
    if ids is None:
        raise ValueError(f"{where}: no ids given")
    if offsets is not None and (len(offsets) != rows + 1 or int(offsets[0]) != 0):
        raise ValueError(f"{where}: expected {rows + 1} offsets from 0, got {len(offsets)}")
    expected = rows if offsets is None else int(offsets[-1])
    if ids.ndim != 1 or len(ids) != expected:
        raise ValueError(f"{where}: expected {expected} ids, got shape {list(ids.shape)}")
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= feature.cardinality):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"{where}: id {bad} outside the valid range [0, {feature.cardinality})")


def _stack_columns(columns: list[torch.Tensor], n: int) -> torch.Tensor:
    """Single-id columns as one ``[n, k]`` matrix (their common integer dtype) for one gather."""
    if not columns:
        return torch.zeros(n, 0, dtype=torch.int64)
    dtype = functools.reduce(torch.promote_types, [c.dtype for c in columns])
    return torch.stack([c.to(dtype) for c in columns], 1)


@dataclass
class DatasetSplits:
    """Train, validation and test datasets that share one set of vocabularies.

    Attributes:
        train, valid, test: the splits.
        name: dataset name.
        vocab_sizes: per table, the number of ids including the OOV id.
    """

    train: CTRDataset
    valid: CTRDataset
    test: CTRDataset
    name: str
    vocab_sizes: dict[str, int]

    def feature_specs(self) -> tuple[FeatureSpec, ...]:
        """The sparse features (identical for all three splits)."""
        return self.train.feature_specs()

    @property
    def dense_dim(self) -> int:
        """Number of dense features."""
        return self.train.dense_dim

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this data (for checkpoints): name, vocabulary sizes, and per split its
        size and a hash of its labels, dense values and ids."""
        return {
            "name": self.name,
            "vocab_sizes": dict(self.vocab_sizes),
            **{split: getattr(self, split).fingerprint() for split in ("train", "valid", "test")},
        }

    def id_counts(self) -> dict[str, torch.Tensor]:
        """Occurrences of every id in the training split, per table (features sharing a table add up)."""
        whole = self.train.batch(torch.arange(len(self.train))).sparse.to_dict()
        counts: dict[str, torch.Tensor] = {}
        for feature in self.feature_specs():
            found = torch.bincount(whole[feature.name].values(), minlength=feature.cardinality)
            table = feature.table_name
            counts[table] = counts[table] + found if table in counts else found
        return counts

    def with_validation_in_train(self) -> "DatasetSplits":
        """Train on train + validation (the way peers that train for fixed epochs use the split)."""
        merged = concat_datasets(f"{self.train.name}+valid", [self.train, self.valid])
        return DatasetSplits(merged, self.valid, self.test, self.name, self.vocab_sizes)


def concat_datasets(name: str, parts: Sequence[CTRDataset]) -> CTRDataset:
    """The rows of `parts`, one after the other, as one dataset (same features required)."""
    features = parts[0].feature_specs()
    if any(p.feature_specs() != features for p in parts):
        raise ValueError(f"cannot concatenate datasets with different features into {name!r}")
    whole = [p.batch(torch.arange(len(p))) for p in parts]
    per_feature = [b.sparse.to_dict() for b in whole]
    ids = {f.name: torch.cat([d[f.name].values() for d in per_feature]) for f in features}
    offsets = {
        f.name: torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat([d[f.name].lengths() for d in per_feature]).cumsum(0)])
        for f in features
        if f.name in parts[0]._jagged
    }
    return CTRDataset(
        name, features, ids, offsets, torch.cat([b.dense for b in whole]), torch.cat([b.labels for b in whole]),
        parts[0].dense_names,
    )
