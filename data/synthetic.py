"""Synthetic Criteo-like data with a planted logistic signal.

Each of `num_fields` categorical fields draws a popularity rank from a truncated power law
(Zipf-like, exponent `zipf_a`, one for all fields or one per field) over ``[0, cardinality)`` by
inverse CDF, then maps the rank through a seeded bijection of ``[0, cardinality)`` (a Feistel
network with cycle walking) so the hot ids are scattered instead of being 0, 1, 2. No vocabulary
is ever materialized, so a field can have a billion ids.

The label is Bernoulli(sigmoid(logit)) with

    logit = bias + signal_std * (sqrt(m) * memo + sqrt(1 - m) * structure) + dense @ beta

- ``memo = sum_f w_f(id_f)``: per-id memorization, ``w_f(id)`` a seeded hash of (field, id) scaled
  to a uniform weight (unit variance in all): only a table that gives the id its own row learns it;
- ``structure = sum_{f<g} <z_f(c_f(id_f)), z_g(c_g(id_g))>``: shared structure; every id belongs to
  one of `clusters` latent clusters of its field (a seeded hash, so no vocabulary), each cluster
  has a Gaussian latent vector of width `latent_dim`, and every pair of fields interacts through
  the inner product of its clusters' vectors (scaled to unit variance): ids of one cluster behave
  alike, which is what shared rows (hashing, QR, multiplexing) can exploit;
- ``m = memorization`` is the knob: the share of the categorical logit's variance that is
  per-id memorization (1: pure memorization, the original generator; 0: pure structure).

The planted logit is the Bayes-optimal score: `SyntheticConfig.planted_logits` recomputes it from
any batch and `bayes_auc` gives the AUC it reaches. Same configuration, same data. Samples are
i.i.d., so the splits are the first 80%, the next 10% and the last 10%.

`criteo_config` is the Criteo-shaped preset: Criteo Kaggle's 26 categorical cardinalities
(33,762,577 ids; ``divide`` scales them down for quick runs), 13 dense features and a per-field
Zipf exponent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from data.batch import Batch, CTRDataset, DatasetSplits
from embtab.config import FeatureSpec

MAX_CARDINALITY = 2**62
CRITEO_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
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
        signal_std: standard deviation of the categorical part of the logit over random ids.
        bias: logit offset (sets the positive rate).
        memorization: share of the categorical logit's variance that is per-id memorization
            (the rest is shared cluster structure); see the module docstring.
        clusters: latent clusters per field (capped at the field's cardinality).
        latent_dim: width of the clusters' latent vectors.
    """

    num_samples: int
    num_fields: int = 26
    cardinalities: int | Sequence[int] = 1_000_000
    zipf_a: float | Sequence[float] = 1.1
    dense_dim: int = 13
    seed: int = 0
    signal_std: float = 1.5
    bias: float = -1.0
    memorization: float = 1.0
    clusters: int = 64
    latent_dim: int = 8

    def __post_init__(self) -> None:
        cards = self.cardinalities
        single = isinstance(cards, (int, np.integer))
        cards = (int(cards),) * self.num_fields if single else tuple(int(c) for c in cards)
        object.__setattr__(self, "cardinalities", cards)
        skews = self.zipf_a
        skews = (float(skews),) * self.num_fields if isinstance(skews, (int, float)) else tuple(map(float, skews))
        object.__setattr__(self, "zipf_a", skews)
        if len(skews) != self.num_fields or min(skews) <= 0:
            raise ValueError(f"expected zipf_a > 0 (one value or {self.num_fields}), got {self.zipf_a}")
        if not 0.0 <= self.memorization <= 1.0:
            raise ValueError(f"memorization must be in [0, 1], got {self.memorization}")
        if self.clusters < 1 or self.latent_dim < 1:
            raise ValueError(f"clusters and latent_dim must be >= 1, got {self.clusters}, {self.latent_dim}")
        if len(cards) != self.num_fields:
            raise ValueError(
                f"cardinalities: {len(cards)} values, expected num_fields={self.num_fields}"
            )
        bad = [c for c in cards if not 1 <= c <= MAX_CARDINALITY]
        if bad:
            raise ValueError(f"cardinalities {bad}: expected each in [1, 2**62]")
        if self.num_samples < 1 or self.num_fields < 1 or self.dense_dim < 0:
            raise ValueError(
                f"expected num_samples >= 1, num_fields >= 1, dense_dim >= 0; got "
                f"{self.num_samples}, {self.num_fields}, {self.dense_dim}"
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
        """Planted memorization weight of each id of `field`: uniform, mean 0, std
        ``signal_std * sqrt(memorization / F)``."""
        scale = self.signal_std * math.sqrt(3.0 * self.memorization / self.num_fields)
        return (2.0 * _unit(ids.astype(np.uint64) ^ np.uint64(self.field_key(field))) - 1.0) * scale

    def cluster_of(self, field: int, ids: np.ndarray) -> np.ndarray:
        """Latent cluster of each id of `field`: a seeded hash into `clusters`; in a field with no
        more ids than clusters every id is a cluster of its own."""
        if self.cardinalities[field] <= self.clusters:
            return ids.astype(np.int64)
        key = np.uint64(self.field_key(field) ^ 0x5DEECE66D)
        return (mix64(ids.astype(np.uint64) ^ key) % np.uint64(self.clusters)).astype(np.int64)

    def latents(self, field: int) -> np.ndarray:
        """The clusters' latent vectors of `field` ``[clusters, latent_dim]``, scaled so that the
        sum over field pairs of their inner products has unit variance."""
        pairs = max(1, self.num_fields * (self.num_fields - 1) // 2)
        std = (pairs * self.latent_dim) ** -0.25
        rng = np.random.default_rng([self.seed, field, 7])
        return rng.standard_normal((self.clusters, self.latent_dim)) * std

    def structure(self, ids: np.ndarray) -> np.ndarray:
        """``sum_{f<g} <z_f, z_g>`` of rows with ids ``[F, N]``: (|sum z|^2 - sum |z|^2) / 2."""
        total = np.zeros((ids.shape[1], self.latent_dim))
        squares = np.zeros(ids.shape[1])
        for field in range(self.num_fields):
            z = self.latents(field)[self.cluster_of(field, ids[field])]
            total += z
            squares += (z * z).sum(1)
        return ((total * total).sum(1) - squares) / 2

    def dense_weights(self) -> np.ndarray:
        """Planted weight of each dense feature (uniform in [-0.5, 0.5))."""
        key = np.uint64(self.field_key(self.num_fields))
        return _unit(np.arange(self.dense_dim, dtype=np.uint64) ^ key) - 0.5

    def logits(self, ids: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """Planted logits of rows with ids ``[F, N]`` and dense ``[N, D]``."""
        total = np.full(ids.shape[1], self.bias)
        if self.memorization > 0:
            for field in range(self.num_fields):
                total += self.weights(field, ids[field])
        if self.memorization < 1:
            total += self.signal_std * math.sqrt(1 - self.memorization) * self.structure(ids)
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
        ranks = zipf_ranks(rng.random(n), card, config.zipf_a[field])
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
    zipf_a: float | Sequence[float] = 1.1,
    dense_dim: int = 13,
    seed: int = 0,
    signal_std: float = 1.5,
    bias: float = -1.0,
    memorization: float | None = None,
    clusters: int = 64,
    latent_dim: int = 8,
    preset: str | None = None,
    divide: int = 1,
) -> DatasetSplits:
    """Synthetic Criteo-like splits; see `SyntheticConfig` for the arguments. ``preset="criteo"``
    takes `criteo_config`'s shape (with `divide` and `memorization`, 0.5 unless given) and ignores
    the shape arguments (fields, cardinalities, skew, dense width)."""
    structure = {"signal_std": signal_std, "bias": bias, "clusters": clusters, "latent_dim": latent_dim}
    if preset == "criteo":
        share = 0.5 if memorization is None else memorization
        return generate_synthetic(criteo_config(num_samples, divide, share, seed, **structure))
    if preset is not None:
        raise ValueError(f"unknown synthetic preset {preset!r}; expected 'criteo' or none")
    if divide != 1:
        raise ValueError(f"divide = {divide} applies to preset 'criteo' only; leave it out")
    share = 1.0 if memorization is None else memorization
    return generate_synthetic(
        SyntheticConfig(num_samples, num_fields, cardinalities, zipf_a, dense_dim, seed, memorization=share, **structure)
    )


def criteo_config(
    num_samples: int, divide: int = 1, memorization: float = 0.5, seed: int = 0, **settings: float
) -> SyntheticConfig:
    """The Criteo-shaped preset: Criteo Kaggle's 26 cardinalities (each divided by `divide`, kept
    at least ``min(n, 8)``), 13 dense features, and a per-field Zipf exponent in [1.05, 1.35]
    (seeded), with `memorization` the share of per-id memorization in the categorical logit."""
    if divide < 1:
        raise ValueError(f"divide must be >= 1, got {divide}")
    cards = tuple(max(min(c, 8), -(-c // divide)) for c in CRITEO_CARDINALITIES)
    skews = tuple(1.05 + 0.3 * float(u) for u in _unit(np.arange(26, dtype=np.uint64) + np.uint64(seed * 101 + 13)))
    settings = {"dense_dim": 13, "seed": seed, "memorization": memorization, **settings}
    return SyntheticConfig(num_samples, 26, cards, skews, **settings)  # type: ignore[arg-type]


def bayes_auc(config: SyntheticConfig, num_samples: int = 200_000) -> float:
    """The AUC of the Bayes-optimal score (the planted logit) on `config`'s distribution: the
    expected AUC over `num_samples` drawn rows, each row counted as a positive with weight p and a
    negative with weight 1 - p (no label noise in the estimate)."""
    sample = generate_synthetic(replace(config, num_samples=num_samples))
    logits = np.concatenate([config.planted_logits(d.batch(torch.arange(len(d)))).numpy()
                             for d in (sample.train, sample.valid, sample.test)])
    p = 1.0 / (1.0 + np.exp(-logits))
    order = np.argsort(logits, kind="stable")
    p, scores = p[order], logits[order]
    q = 1 - p
    # per row: the negative weight of every other row with a smaller score, half of those tied
    _, first, counts = np.unique(scores, return_index=True, return_counts=True)
    tied = np.repeat(np.add.reduceat(q, first), counts)
    smaller = np.repeat(np.cumsum(q)[first] - q[first], counts)
    below = smaller + 0.5 * (tied - q)
    return float((p * below).sum() / (p.sum() * q.sum() - (p * q).sum()))
