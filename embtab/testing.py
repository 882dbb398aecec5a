"""Inputs for tests and examples: random `KeyedJaggedTensor`s that respect a feature spec."""

from __future__ import annotations

from typing import Sequence

import torch
from torchrec import KeyedJaggedTensor

from embtab.config import FeatureSpec


def random_kjt(
    features: Sequence[FeatureSpec],
    batch: int,
    seed: int,
    max_len: int = 3,
    hot_ids: Sequence[int] = (),
    hot_tables: Sequence[str] = (),
) -> KeyedJaggedTensor:
    """Bags of 0..`max_len` random valid ids per feature and sample (at least one id where the
    feature rejects empty bags); every third id of a table in `hot_tables` is one of `hot_ids`."""
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for feature in features:
        low = 1 if feature.rejects_empty else 0
        feature_lengths = torch.randint(low, max_len + 1, (batch,), generator=g)
        ids = torch.randint(0, feature.cardinality, (int(feature_lengths.sum()),), generator=g)
        if feature.table_name in hot_tables:
            picks = torch.randint(0, len(hot_ids), (len(ids[::3]),), generator=g)
            ids[::3] = torch.tensor(hot_ids, dtype=ids.dtype)[picks]
        lengths.append(feature_lengths)
        values.append(ids)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in features], values=torch.cat(values), lengths=torch.cat(lengths)
    )
