"""Synthetic Criteo-like data: reproducibility, id ranges, skew, planted signal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional import auroc

from data import SyntheticConfig, generate_synthetic, load_dataset, make_synthetic
from data.synthetic import permute, zipf_ranks


def everything(ds) -> torch.Tensor:
    batch = ds.batch(torch.arange(len(ds)))
    return torch.cat([batch.sparse.values().float(), batch.dense.flatten(), batch.labels])


def test_same_seed_same_data_other_seed_other_data() -> None:
    a = make_synthetic(2_000, num_fields=4, cardinalities=1000, dense_dim=2, seed=5)
    b = make_synthetic(2_000, num_fields=4, cardinalities=1000, dense_dim=2, seed=5)
    c = make_synthetic(2_000, num_fields=4, cardinalities=1000, dense_dim=2, seed=6)
    for split in ("train", "valid", "test"):
        assert torch.equal(everything(getattr(a, split)), everything(getattr(b, split)))
    assert not torch.equal(everything(a.train), everything(c.train))


def test_shapes_specs_and_splits() -> None:
    splits = make_synthetic(1_000, num_fields=3, cardinalities=[10, 10**6, 10**9], dense_dim=0)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (800, 100, 100)
    assert [(f.name, f.cardinality) for f in splits.feature_specs()] == [
        ("C1", 10),
        ("C2", 10**6),
        ("C3", 10**9),
    ]
    batch = splits.train.batch(torch.arange(800))
    assert batch.dense.shape == (800, 0)
    for name, card in (("C1", 10), ("C2", 10**6), ("C3", 10**9)):
        ids = batch.sparse[name].values()
        assert int(ids.min()) >= 0 and int(ids.max()) < card


def test_ids_are_skewed_and_hot_ids_scattered() -> None:
    splits = make_synthetic(20_000, num_fields=2, cardinalities=10**9, dense_dim=0, zipf_a=1.2)
    ids = splits.train.batch(torch.arange(len(splits.train))).sparse["C1"].values()
    values, counts = torch.unique(ids, return_counts=True)
    hottest = values[torch.argsort(counts, descending=True)[:5]]
    assert counts.max() > 0.05 * len(ids)  # uniform over 1e9 ids would repeat nothing
    assert int(hottest.min()) > 1000  # the hot ids are not 0, 1, 2, ...
    other = splits.train.batch(torch.arange(len(splits.train))).sparse["C2"].values()
    assert torch.mode(other).values != torch.mode(ids).values  # each field has its own permutation


def test_permutation_is_a_bijection() -> None:
    for card in (1, 7, 1000, 4097):
        out = permute(np.arange(card), card, key=12345)
        assert sorted(out.tolist()) == list(range(card))
    assert not np.array_equal(permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2))


def test_zipf_ranks_follow_a_power_law() -> None:
    ranks = zipf_ranks(np.random.default_rng(0).random(200_000), 10**6, a=1.1)
    counts = np.bincount(ranks[ranks < 100], minlength=100)
    assert counts[0] > counts[9] > counts[99] > 0
    # density x^-a: P(rank 0) / P(rank 9) = (1 - 2^-0.1) / (10^-0.1 - 11^-0.1) ~ 8.9
    assert 8.3 < counts[0] / counts[9] < 9.5


def test_planted_signal_is_learnable() -> None:
    config = SyntheticConfig(20_000, num_fields=8, cardinalities=10_000, dense_dim=4, seed=1)
    splits = generate_synthetic(config)
    test = splits.test.batch(torch.arange(len(splits.test)))
    score = config.planted_logits(test)
    assert float(auroc(score, test.labels.long(), task="binary")) > 0.7
    assert 0.1 < float(splits.train.labels.mean()) < 0.6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_fields": 2, "cardinalities": [5]}, "1 values, expected num_fields=2"),
        ({"cardinalities": 0}, r"cardinalities \[0"),
        ({"zipf_a": 0.0}, "zipf_a > 0"),
    ],
)
def test_bad_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(10, **kwargs)


def test_load_dataset_by_name() -> None:
    splits = load_dataset("synthetic", num_samples=100, num_fields=2, dense_dim=1, seed=2)
    same = make_synthetic(100, num_fields=2, dense_dim=1, seed=2)
    assert torch.equal(everything(splits.test), everything(same.test))


def test_criteo_preset_has_criteo_shape_and_the_scaled_version_divides_it() -> None:
    from data.synthetic import CRITEO_CARDINALITIES, criteo_config

    full = criteo_config(10)
    assert full.cardinalities == CRITEO_CARDINALITIES and sum(full.cardinalities) == 33_762_577
    assert full.num_fields == 26 and full.dense_dim == 13 and len(set(full.zipf_a)) == 26
    small = criteo_config(10, divide=100)
    assert small.cardinalities[2] == 101_313 and small.cardinalities[8] == 3  # 10,131,227 / 100; 3 kept
    splits = make_synthetic(500, preset="criteo", divide=1000, memorization=0.3, seed=4)
    assert len(splits.feature_specs()) == 26 and splits.dense_dim == 13
    again = make_synthetic(500, preset="criteo", divide=1000, memorization=0.3, seed=4)
    assert torch.equal(everything(splits.train), everything(again.train))
    with pytest.raises(ValueError, match="memorization must be in"):
        criteo_config(10, memorization=1.5)


def test_structure_and_memorization_each_have_the_variance_the_knob_gives() -> None:
    from data.synthetic import criteo_config

    config = criteo_config(1, divide=100, memorization=0.25)
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, c, 20_000) for c in config.cardinalities])
    structure = config.structure(ids)
    memo = sum(config.weights(f, ids[f]) for f in range(26))
    assert abs(structure.std() - 1) < 0.15 and abs(structure.mean()) < 0.05
    assert abs(memo.std() - config.signal_std * 0.5) < 0.05  # sqrt(0.25) of the categorical std
    # ids of one cluster share their structure: the structure term depends on clusters only
    clusters = np.stack([config.cluster_of(f, ids[f]) for f in range(26)])
    assert len(np.unique(clusters[0])) == config.cardinalities[0] == 15  # small field: an id per cluster
    assert len(np.unique(clusters[2])) == 64  # 101,313 ids share 64 clusters


def test_bayes_auc_matches_the_auc_of_the_planted_logit_on_sampled_labels() -> None:
    from data.synthetic import bayes_auc, criteo_config

    config = criteo_config(60_000, divide=1000, memorization=0.5, seed=1)
    expected = bayes_auc(config, 60_000)
    splits = generate_synthetic(config)
    batches = [d.batch(torch.arange(len(d))) for d in (splits.train, splits.valid, splits.test)]
    logits = torch.cat([config.planted_logits(b) for b in batches])
    labels = torch.cat([b.labels for b in batches]).long()
    sampled = float(auroc(logits, labels, task="binary"))
    assert abs(sampled - expected) < 0.01 and 0.7 < expected < 0.95
    pure_memo = bayes_auc(criteo_config(1, divide=1000, memorization=1.0, seed=1), 20_000)
    assert abs(pure_memo - expected) > 0.002  # the knob changes the problem
