"""CTRDataset gathers and the deterministic, resumable DataLoader."""

from __future__ import annotations

import pytest
import torch

from data import Batch, CTRDataset, make_dataloader
from data.batch import jagged_gather
from embtab.config import FeatureSpec

N = 10


def tiny() -> CTRDataset:
    """Row i: a = i, seq = [i .. 2i - 1] (row 0 empty), tags = [i % 3], dense i, label i % 2."""
    lengths = torch.arange(N)
    seq = torch.cat([torch.arange(i, 2 * i) for i in range(N)])
    features = [
        FeatureSpec("a", N, required=True),
        FeatureSpec("seq", 2 * N, pooling="none"),
        FeatureSpec("tags", 3),
    ]
    return CTRDataset(
        "tiny",
        features,
        {"a": torch.arange(N, dtype=torch.int32), "seq": seq, "tags": torch.arange(N) % 3},
        {
            "seq": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
            "tags": torch.arange(N + 1),
        },
        torch.arange(N, dtype=torch.float32)[:, None],
        (torch.arange(N) % 2).float(),
        ("x",),
    )


def test_batch_gathers_rows_in_key_order() -> None:
    rows = torch.tensor([3, 0, 7, 3])
    batch = tiny().batch(rows)
    assert batch.sparse.keys() == ["a", "seq", "tags"] and len(batch) == 4
    assert batch.sparse.values().dtype == torch.int64
    assert batch.sparse["a"].values().tolist() == [3, 0, 7, 3]
    assert batch.sparse["seq"].lengths().tolist() == [3, 0, 7, 3]
    assert batch.sparse["seq"].values().tolist() == [3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 3, 4, 5]
    assert batch.sparse["tags"].values().tolist() == [0, 0, 1, 0]
    assert batch.dense.tolist() == [[3.0], [0.0], [7.0], [3.0]] and batch.labels.tolist() == [
        1,
        0,
        1,
        1,
    ]
    assert batch.to("cpu").sparse.values().tolist() == batch.sparse.values().tolist()


def test_jagged_gather_matches_slicing() -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 5, (50,), generator=generator)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values = torch.randperm(int(offsets[-1]), generator=generator)
    rows = torch.randint(0, 50, (30,), generator=generator)
    got, got_lengths = jagged_gather(values, offsets, rows)
    expected = torch.cat([values[offsets[r] : offsets[r + 1]] for r in rows])
    assert torch.equal(got, expected) and torch.equal(got_lengths, lengths[rows])


def test_indexing_forms() -> None:
    ds = tiny()
    assert len(ds[4]) == 1 and ds[4].sparse["a"].values().tolist() == [4]
    assert ds[2:5].sparse["a"].values().tolist() == [2, 3, 4]
    assert ds.__getitems__([1, 2]).labels.tolist() == [1.0, 0.0]
    assert len(ds.batch(torch.tensor([], dtype=torch.int64))) == 0
    with pytest.raises(IndexError, match=r"row indices must lie in \[0, 10\), got min 0, max 10"):
        ds.batch(torch.tensor([0, 10]))


def test_bad_columns_raise() -> None:
    spec = [FeatureSpec("a", 3)]
    with pytest.raises(ValueError, match=r"feature 'a': id 3 outside the valid range \[0, 3\)"):
        CTRDataset("d", spec, {"a": torch.tensor([0, 3])}, {}, torch.zeros(2, 0), torch.zeros(2))
    with pytest.raises(ValueError, match=r"feature 'a': expected 2 ids"):
        CTRDataset("d", spec, {"a": torch.tensor([0])}, {}, torch.zeros(2, 0), torch.zeros(2))


def served(loader) -> list[list[int]]:
    return [b.sparse["a"].values().tolist() for b in loader]


def test_loader_order_is_a_function_of_seed_and_epoch() -> None:
    loader = make_dataloader(tiny(), batch_size=3, shuffle=True, seed=7)
    assert len(loader) == 4 and all(isinstance(b, Batch) for b in loader)
    first = served(loader)
    assert sorted(sum(first, [])) == list(range(N)) and [len(b) for b in first] == [3, 3, 3, 1]
    assert served(loader) == first  # same epoch, same order
    loader.batch_sampler.set_epoch(1)
    second = served(loader)
    assert second != first and sorted(sum(second, [])) == list(range(N))
    again = make_dataloader(tiny(), batch_size=3, shuffle=True, seed=7, epoch=1)
    assert served(again) == second
    assert served(make_dataloader(tiny(), batch_size=3, shuffle=True, seed=8, epoch=1)) != second


def test_loader_resumes_mid_epoch() -> None:
    full = served(make_dataloader(tiny(), batch_size=3, shuffle=True, seed=1, epoch=2))
    resumed = make_dataloader(tiny(), batch_size=3, shuffle=True, seed=1, epoch=2, start_batch=2)
    assert len(resumed) == 2 and served(resumed) == full[2:]
    state = resumed.batch_sampler.state_dict()
    fresh = make_dataloader(tiny(), batch_size=3, shuffle=True, seed=1)
    fresh.batch_sampler.load_state_dict(state)
    assert served(fresh) == full[2:]
    with pytest.raises(ValueError, match=r"start_batch must lie in \[0, 4\]"):
        fresh.batch_sampler.set_epoch(0, start_batch=5)


def test_loader_without_shuffle_and_drop_last() -> None:
    loader = make_dataloader(tiny(), batch_size=4, shuffle=False, drop_last=True)
    assert served(loader) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_loader_with_a_worker_process() -> None:
    loader = make_dataloader(tiny(), batch_size=4, shuffle=True, seed=3, num_workers=1)
    assert served(loader) == served(make_dataloader(tiny(), batch_size=4, shuffle=True, seed=3))


def test_validation_in_train_concatenates_rows_in_order():
    from data import make_synthetic

    splits = make_synthetic(num_samples=300, num_fields=3, cardinalities=50, dense_dim=2, seed=3)
    merged = splits.with_validation_in_train()
    assert len(merged.train) == len(splits.train) + len(splits.valid)
    tail = merged.train.batch(torch.arange(len(splits.train), len(merged.train)))
    direct = splits.valid.batch(torch.arange(len(splits.valid)))
    assert torch.equal(tail.labels, direct.labels) and torch.equal(tail.dense, direct.dense)
    assert torch.equal(tail.sparse.values(), direct.sparse.values())
    assert torch.equal(tail.sparse.lengths(), direct.sparse.lengths())


def test_id_counts_add_up_per_table(movielens_root):
    from data import load_movielens_100k

    splits = load_movielens_100k(cache_dir=movielens_root)
    counts = splits.id_counts()
    assert set(counts) == {"user_id", "item_id", "item_genre", "gender", "age", "occupation"}
    assert int(counts["user_id"].sum()) == len(splits.train)
    history = splits.train.batch(torch.arange(len(splits.train))).sparse["hist_item_ids"].values()
    assert int(counts["item_id"].sum()) == len(splits.train) + history.numel()
    assert counts["item_id"].shape == (splits.feature_specs()[1].cardinality,)
