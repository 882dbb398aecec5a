"""MovieLens: raw counts, the reference DIN split, source equivalence, GroupLens formats."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from data import (
    DatasetSplits,
    ensure_movielens_100k,
    load_dataset,
    load_movielens_1m,
    load_movielens_100k,
)
from data.movielens import (
    GENRES,
    RECBOLE_FILES,
    RECBOLE_MEMBER_DIR,
    MovieLensTables,
    read_grouplens_100k,
)

KEYS = [
    "user_id",
    "item_id",
    "item_genre",
    "gender",
    "age",
    "occupation",
    "hist_item_ids",
    "hist_genres",
]


@pytest.fixture(scope="module")
def splits(movielens_root: Path) -> DatasetSplits:
    return load_movielens_100k(cache_dir=movielens_root)


def full(ds) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Every row of `ds`: per-feature values and lengths, and labels."""
    batch = ds.batch(torch.arange(len(ds)))
    jagged = batch.sparse.to_dict()
    return (
        {k: v.values() for k, v in jagged.items()},
        {k: v.lengths() for k, v in jagged.items()},
        batch.labels,
    )


def test_raw_files_have_100k_ratings_943_users_1682_items(
    movielens_tables: MovieLensTables,
) -> None:
    assert len(movielens_tables.ratings) == 100_000
    assert len(movielens_tables.users) == 943
    assert len(movielens_tables.items) == 1_682
    assert movielens_tables.ratings["user_id"].n_unique() == 943
    assert movielens_tables.ratings["item_id"].n_unique() == 1_682


def test_reference_split_counts_and_positive_rates(splits: DatasetSplits) -> None:
    train_labels = torch.cat([splits.train.labels, splits.valid.labels])
    assert len(splits.train) + len(splits.valid) + len(splits.test) == 99_057
    assert len(train_labels) == 78_870
    assert len(splits.test) == 20_187
    assert round(float(train_labels.mean()), 3) == 0.572
    assert round(float(splits.test.labels.mean()), 3) == 0.479


def test_validation_is_last_tenth_of_each_users_train_samples(
    splits: DatasetSplits, movielens_tables: MovieLensTables
) -> None:
    samples = (
        movielens_tables.ratings["user_id"].value_counts()["count"].to_numpy().astype(np.int64) - 1
    )
    n_train = samples * 8 // 10
    assert len(splits.valid) == int(np.sum(-(-n_train // 10)))
    assert len(splits.test) == int(np.sum(samples - n_train))


def test_samples_follow_timestamp_then_item_order(
    splits: DatasetSplits, movielens_tables: MovieLensTables
) -> None:
    ratings = movielens_tables.ratings
    # a user whose ties, in file order, are not in item order: only the tie-break passes
    by_item = ratings.sort("user_id", "timestamp", "item_id")
    by_file = ratings.with_row_index().sort("user_id", "timestamp", "index")
    user = int(by_item.filter(by_item["item_id"] != by_file["item_id"])["user_id"][0])
    mine = ratings.filter(pl.col("user_id") == user).sort("timestamp", "item_id")
    items, labels = mine["item_id"].to_numpy(), (mine["rating"].to_numpy() >= 4)
    # raw ids 1..n are contiguous, so the vocabularies keep them: encoded id == raw id
    histories, item_ids, got_labels = [], [], []
    for ds in (splits.train, splits.valid, splits.test):
        users = ds.batch(torch.arange(len(ds))).sparse["user_id"].values()
        batch = ds.batch(torch.nonzero(users == user).flatten())
        histories += [h.tolist() for h in batch.sparse["hist_item_ids"].to_dense()]
        item_ids += batch.sparse["item_id"].values().tolist()
        got_labels += batch.labels.tolist()
    assert item_ids == items[1:].tolist()
    assert got_labels == labels[1:].astype(float).tolist()
    assert histories == [items[max(0, p - 20) : p].tolist() for p in range(1, len(items))]


def test_load_dataset_by_name(splits: DatasetSplits, movielens_root: Path) -> None:
    by_name = load_dataset("movielens", cache_dir=movielens_root)
    assert by_name.feature_specs() == splits.feature_specs()
    assert torch.equal(by_name.test.labels, splits.test.labels)


def test_feature_specs_and_batches(splits: DatasetSplits) -> None:
    specs = {f.name: f for f in splits.feature_specs()}
    assert [f.name for f in splits.feature_specs()] == KEYS
    assert (specs["user_id"].cardinality, specs["item_id"].cardinality) == (944, 1683)
    assert specs["item_genre"].cardinality == len(GENRES) + 1
    assert specs["gender"].cardinality == 3
    assert specs["hist_item_ids"].table == "item_id" and specs["hist_item_ids"].pooling == "none"
    assert specs["hist_genres"].table == "item_genre"
    assert specs["hist_genres"].cardinality == specs["item_genre"].cardinality
    assert splits.vocab_sizes["item_id"] == 1683 and splits.dense_dim == 0
    batch = splits.train.batch(torch.arange(256))
    assert batch.sparse.keys() == KEYS and batch.dense.shape == (256, 0)
    hist = batch.sparse["hist_item_ids"].lengths()
    assert int(hist.min()) >= 1 and int(hist.max()) == 20
    assert torch.equal(hist, batch.sparse["hist_genres"].lengths())


def test_history_genres_are_the_history_items_genres(splits: DatasetSplits) -> None:
    ids, _, _ = full(splits.train)
    genre_of = torch.zeros(1683, dtype=torch.int64)
    genre_of[ids["item_id"].long()] = ids["item_genre"].long()
    assert torch.equal(genre_of[ids["hist_item_ids"].long()], ids["hist_genres"].long())


def to_grouplens(tables_dir: Path, out: Path) -> Path:
    """Rewrite RecBole's ml-100k files in GroupLens's u.data / u.item / u.user formats."""
    out.mkdir()
    inter, item, user = (
        pl.read_csv(tables_dir / name, separator="\t", quote_char=None, infer_schema=False)
        for name in RECBOLE_FILES
    )
    inter.write_csv(out / "u.data", separator="\t", include_header=False)
    classes = pl.col("class:token_seq").fill_null("").str.split(" ")
    flags = [classes.list.contains(g).cast(pl.Int8).alias(g) for g in GENRES]
    video, url = pl.lit("").alias("video"), pl.lit("http://x").alias("url")
    item = item.select(
        "item_id:token", "movie_title:token_seq", "release_year:token", video, url, *flags
    )
    text = item.write_csv(separator="|", include_header=False, quote_style="never")
    (out / "u.item").write_bytes(text.encode("latin-1", "replace"))
    user = user.select(
        "user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"
    )
    user.write_csv(out / "u.user", separator="|", include_header=False)
    return out


def assert_same(a: DatasetSplits, b: DatasetSplits) -> None:
    for split in ("train", "valid", "test"):
        assert len(getattr(a, split)) == len(getattr(b, split))
        if not len(getattr(a, split)):
            continue
        (va, la, ya), (vb, lb, yb) = full(getattr(a, split)), full(getattr(b, split))
        assert all(torch.equal(va[k], vb[k]) and torch.equal(la[k], lb[k]) for k in KEYS)
        assert torch.equal(ya, yb)
    assert a.feature_specs() == b.feature_specs()


def test_grouplens_folder_and_zip_give_identical_samples(
    splits: DatasetSplits, movielens_root: Path, tmp_path: Path
) -> None:
    folder = to_grouplens(movielens_root / "ml-100k", tmp_path / "ml-100k")
    assert_same(splits, load_movielens_100k(folder, cache_dir=tmp_path))
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w") as archive:
        for name in ("u.data", "u.item", "u.user"):
            archive.write(folder / name, f"ml-100k/{name}")
    from_zip, from_folder = (
        read_grouplens_100k(tmp_path / "ml-100k.zip"),
        read_grouplens_100k(folder),
    )
    for table in ("ratings", "items", "users"):
        assert getattr(from_zip, table).equals(getattr(from_folder, table))


def test_history_len_bounds_histories(movielens_root: Path) -> None:
    short = load_movielens_100k(cache_dir=movielens_root, history_len=3)
    lengths = short.test.batch(torch.arange(len(short.test))).sparse["hist_item_ids"].lengths()
    assert int(lengths.max()) == 3 and len(short.test) == 20_187


def write_ml1m(
    folder: Path, movies: str = "1::A (1995)::Comedy|Action\n2::B (1996)::Drama\n"
) -> Path:
    folder.mkdir(exist_ok=True)
    ratings = [
        (1, 2, 5, 10),
        (1, 1, 3, 10),
        (1, 2, 4, 11),
        (2, 1, 1, 5),
        (2, 2, 4, 6),
        (2, 1, 5, 7),
    ]
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ratings))
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (folder / "movies.dat").write_bytes(movies.encode("latin-1"))
    return folder


def test_movielens_1m_format(tmp_path: Path) -> None:
    splits = load_movielens_1m(write_ml1m(tmp_path / "ml-1m"), cache_dir=tmp_path)
    # each user: 3 ratings -> 2 samples -> floor(1.6) = 1 train sample, which is also the last
    # ceil(0.1 * 1) = 1 of train, so validation; ceil(0.4) = 1 test sample
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (0, 2, 2)
    test = splits.test.batch(torch.arange(2))
    # user 1 sorted by (timestamp, item): items 1, 2, 2 -> last sample item 2 with history [1, 2]
    assert test.sparse["item_id"].values().tolist() == [2, 1]
    assert test.sparse["hist_item_ids"].to_dense()[0].tolist() == [1, 2]
    assert test.labels.tolist() == [1.0, 1.0]
    # item 1's genres "Comedy|Action": first in GroupLens order is Action (vocab: Action, Drama)
    assert test.sparse["item_genre"].values().tolist() == [2, 1]
    with zipfile.ZipFile(tmp_path / "ml-1m.zip", "w") as archive:
        for name in ("ratings.dat", "movies.dat", "users.dat"):
            archive.write(tmp_path / "ml-1m" / name, f"ml-1m/{name}")
    assert_same(splits, load_movielens_1m(tmp_path / "ml-1m.zip", cache_dir=tmp_path))


def test_movielens_1m_malformed_line(tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path / "ml-1m")
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16\n")
    with pytest.raises(
        ValueError, match=r"users.dat, line 2: 4 fields separated by '::', expected 5"
    ):
        load_movielens_1m(folder, cache_dir=tmp_path)


def test_movielens_1m_unknown_genre(tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path / "ml-1m", movies="1::A (1995)::Comedy|Spaghetti\n")
    with pytest.raises(ValueError, match=r"movies.dat, line 1, column 'genres': genre 'Spaghetti'"):
        load_movielens_1m(folder, cache_dir=tmp_path)


def test_grouplens_100k_bad_rating(tmp_path: Path) -> None:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text("1\t1\t5\t100\n1\t2\tfive\t101\n")
    (folder / "u.item").write_text(
        "1|A|x||u|" + "|".join("0" * 18) + "|1\n2|B|x||u|" + "|".join("1" * 19) + "\n"
    )
    (folder / "u.user").write_text("1|24|M|technician|85711\n")
    with pytest.raises(
        ValueError, match=r"u.data, line 2, column 'rating': value 'five', expected Float64"
    ):
        load_movielens_100k(folder, cache_dir=tmp_path)


def fake_pip(wheel_members: dict[str, bytes], returncode: int = 0):
    """A stand-in for ``subprocess.run(pip download ...)`` writing a wheel with `wheel_members`."""

    def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
        target = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(target / "recbole-1.2.1-py3-none-any.whl", "w") as wheel:
            for name, data in wheel_members.items():
                wheel.writestr(name, data)
        return subprocess.CompletedProcess(command, returncode, "", "no network")

    return run


def test_ensure_movielens_extracts_only_the_three_files(tmp_path: Path, monkeypatch) -> None:
    members = {RECBOLE_MEMBER_DIR + n: n.encode() for n in (*RECBOLE_FILES, "ml-100k.kg")}
    monkeypatch.setattr(subprocess, "run", fake_pip(members))
    folder = ensure_movielens_100k(tmp_path / "ml")
    assert sorted(p.name for p in folder.iterdir()) == sorted(RECBOLE_FILES)
    assert (folder / "ml-100k.item").read_bytes() == b"ml-100k.item"
    monkeypatch.setattr(subprocess, "run", fake_pip({}, returncode=1))
    assert ensure_movielens_100k(tmp_path / "ml") == folder  # present: no download


def test_ensure_movielens_reports_failed_download(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(subprocess, "run", fake_pip({}, returncode=1))
    with pytest.raises(RuntimeError, match="no network"):
        ensure_movielens_100k(tmp_path / "ml")
    assert not any((tmp_path / "ml").iterdir())


def test_grouplens_path_that_is_neither_folder_nor_zip(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("1\t1\t5\t100\n")
    with pytest.raises(FileNotFoundError, match=r"u.data: expected a folder holding \['u.data'"):
        load_movielens_100k(tmp_path / "u.data", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"folder lacks \['u.item', 'u.user'\]"):
        load_movielens_100k(tmp_path, cache_dir=tmp_path)
