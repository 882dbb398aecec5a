"""Synthetic Criteo-like data with a planted logistic signal.

Each of `num_fields` categorical fields draws a popularity rank from a truncated power law
(Zipf-like, exponent `zipf_a`) over ``[0, cardinality)`` by inverse CDF, then maps the rank
through a seeded bijection of ``[0, cardinality)`` (a Feistel network with cycle walking) so the
hot ids are scattered instead of being 0, 1, 2. No vocabulary is ever materialized, so a field
can have a billion ids.

The label is Bernoulli(sigmoid(logit)) with ``logit = bias + sum_f w_f(id_f) + dense @ beta``,
where ``w_f(id)`` is a seeded hash of (field, id) scaled to a uniform weight: the planted logit is
the Bayes-optimal score, and `SyntheticConfig.planted_logits` recomputes it from any batch.
Same configuration, same data. Samples are i.i.d., so the splits are the first 80%, the next
10% and the last 10%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from data.batch import Batch, CTRDataset, DatasetSplits
from embtab.config import FeatureSpec

MAX_CARDINALITY = 2**62
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer of uint64 values: a fast, well-mixing deterministic hash."""
    x = x.astype(np.uint64) + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _unit(x: np.ndarray) -> np.ndarray:
    """Hash values to floats uniform in [0, 1)."""
    return (mix64(x) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def zipf_ranks(u: np.ndarray, cardinality: int, a: float) -> np.ndarray:
    """Inverse CDF of the density ``x^-a`` on ``[1, cardinality + 1)`` at uniforms `u`, as ranks
    ``floor(x) - 1`` in ``[0, cardinality)`` (rank 0 the most frequent)."""
    top = float(cardinality + 1)
    if abs(a - 1.0) < 1e-9:
        x = top**u
    else:
        x = (1.0 - u * (1.0 - top ** (1.0 - a))) ** (1.0 / (1.0 - a))
    return np.minimum(np.floor(x).astype(np.int64) - 1, cardinality - 1)


def permute(x: np.ndarray, cardinality: int, key: int) -> np.ndarray:
    """A seeded bijection of ``[0, cardinality)`` applied to `x`: a 4-round Feistel network on
    the smallest even bit width covering the range, re-applied to values that land outside it
    (cycle walking), which keeps it a bijection of ``[0, cardinality)``."""
    half = max(1, math.ceil(math.log2(max(cardinality, 2)) / 2))
    mask = np.uint64((1 << half) - 1)
    keys = mix64(np.arange(4, dtype=np.uint64) + np.uint64(key))
    out = x.astype(np.uint64)
    todo = np.ones(out.shape, dtype=bool)
    while todo.any():
        left, right = out[todo] >> np.uint64(half), out[todo] & mask
        for round_key in keys:
            left, right = right, left ^ (mix64(right ^ round_key) & mask)
        out[todo] = (left << np.uint64(half)) | right
        todo = out >= np.uint64(cardinality)
    return out.astype(np.int64)


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines a synthetic dataset.

    Args:
        num_samples: rows in all splits together.
        num_fields: categorical fields, named ``C1 .. C<num_fields>``.
        cardinalities: ids per field (one value for all, or one per field), at most 2**62.
        zipf_a: power-law exponent of the id popularity (larger: more skewed).
        dense_dim: standard-normal dense features, named ``I1 .. I<dense_dim>``.
        seed: seed of every random draw and hash.
        signal_std: standard deviation of the summed categorical weights over random ids.
        bias: logit offset (sets the positive rate).
    """

    num_samples: int
    num_fields: int = 26
    cardinalities: int | Sequence[int] = 1_000_000
    zipf_a: float = 1.1
    dense_dim: int = 13
    seed: int = 0
    signal_std: float = 1.5
    bias: float = -1.0

    def __post_init__(self) -> None:
        cards = self.cardinalities
        single = isinstance(cards, (int, np.integer))
        cards = (int(cards),) * self.num_fields if single else tuple(int(c) for c in cards)
        object.__setattr__(self, "cardinalities", cards)
        if len(cards) != self.num_fields:
            raise ValueError(
                f"cardinalities: {len(cards)} values, expected num_fields={self.num_fields}"
            )
        bad = [c for c in cards if not 1 <= c <= MAX_CARDINALITY]
        if bad:
            raise ValueError(f"cardinalities {bad}: expected each in [1, 2**62]")
        if self.zipf_a <= 0 or self.num_samples < 1 or self.num_fields < 1 or self.dense_dim < 0:
            raise ValueError(
                f"expected zipf_a > 0, num_samples >= 1, num_fields >= 1, dense_dim >= 0; got "
                f"{self.zipf_a}, {self.num_samples}, {self.num_fields}, {self.dense_dim}"
            )

    @property
    def sparse_names(self) -> tuple[str, ...]:
        return tuple(f"C{f + 1}" for f in range(self.num_fields))

    @property
    def dense_names(self) -> tuple[str, ...]:
        return tuple(f"I{j + 1}" for j in range(self.dense_dim))

    def field_key(self, field: int) -> int:
        """Seeded 64-bit key of field `field` (index `num_fields` keys the dense weights)."""
        return int(mix64(np.array([(self.seed * 1_000_003 + field) % 2**64], dtype=np.uint64))[0])

    def weights(self, field: int, ids: np.ndarray) -> np.ndarray:
        """Planted weight of each id of `field`: uniform, mean 0, std ``signal_std / sqrt(F)``."""
        scale = self.signal_std * math.sqrt(3.0 / self.num_fields)
        return (2.0 * _unit(ids.astype(np.uint64) ^ np.uint64(self.field_key(field))) - 1.0) * scale

    def dense_weights(self) -> np.ndarray:
        """Planted weight of each dense feature (uniform in [-0.5, 0.5))."""
        key = np.uint64(self.field_key(self.num_fields))
        return _unit(np.arange(self.dense_dim, dtype=np.uint64) ^ key) - 0.5

    def logits(self, ids: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """Planted logits of rows with ids ``[F, N]`` and dense ``[N, D]``."""
        total = np.full(ids.shape[1], self.bias)
        for field in range(self.num_fields):
            total += self.weights(field, ids[field])
        return total + dense.astype(np.float64) @ self.dense_weights()

    def planted_logits(self, batch: Batch) -> torch.Tensor:
        """The Bayes-optimal score (planted logit) of every row of `batch` (float64)."""
        ids = np.stack([batch.sparse[name].values().numpy() for name in self.sparse_names])
        return torch.from_numpy(self.logits(ids, batch.dense.numpy()))


def generate_synthetic(config: SyntheticConfig) -> DatasetSplits:
    """Draw the dataset `config` describes and split it 80/10/10 (first, next, last rows)."""
    rng = np.random.default_rng(config.seed)
    n = config.num_samples
    ids = np.empty((config.num_fields, n), dtype=np.int64)
    for field, card in enumerate(config.cardinalities):
        ranks = zipf_ranks(rng.random(n), card, config.zipf_a)
        ids[field] = permute(ranks, card, config.field_key(field))
    dense = rng.standard_normal((n, config.dense_dim)).astype(np.float32)
    probability = 1.0 / (1.0 + np.exp(-config.logits(ids, dense)))
    labels = (rng.random(n) < probability).astype(np.float32)
    features = tuple(
        FeatureSpec(name, card, required=True)
        for name, card in zip(config.sparse_names, config.cardinalities)
    )
    bounds = [0, round(0.8 * n), round(0.9 * n), n]
    parts = [
        CTRDataset(
            f"synthetic/{split}",
            features,
            {name: torch.from_numpy(ids[f, lo:hi]) for f, name in enumerate(config.sparse_names)},
            {},
            torch.from_numpy(dense[lo:hi]),
            torch.from_numpy(labels[lo:hi]),
            config.dense_names,
        )
        for split, lo, hi in zip(("train", "valid", "test"), bounds, bounds[1:])
    ]
    sizes = dict(zip(config.sparse_names, config.cardinalities))
    return DatasetSplits(*parts, name="synthetic", vocab_sizes=sizes)


def make_synthetic(
    num_samples: int,
    num_fields: int = 26,
    cardinalities: int | Sequence[int] = 1_000_000,
    zipf_a: float = 1.1,
    dense_dim: int = 13,
    seed: int = 0,
) -> DatasetSplits:
    """Synthetic Criteo-like splits; see `SyntheticConfig` for the arguments."""
    return generate_synthetic(
        SyntheticConfig(num_samples, num_fields, cardinalities, zipf_a, dense_dim, seed)
    )
