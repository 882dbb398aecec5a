"""Generic reader: schemas from TOML, vocabularies, splits, validation errors and the cache."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import polars as pl
import pytest
import torch

from data import ColumnSpec, Schema, Vocabulary, load_dataset, read_dataset
from data import reader as reader_module
from data import schema as schema_module
from data.cache import Processed

SCHEMA_TOML = """
name = "toy"
format = "csv"
files = ["toy.csv"]
seed = 3

[[columns]]
name = "user"
kind = "categorical"
min_count = 2

[[columns]]
name = "item"
kind = "categorical"

[[columns]]
name = "tags"
kind = "multi_hot"

[[columns]]
name = "hist"
kind = "sequence"
table = "item"

[[columns]]
name = "price"
kind = "dense"
transform = "log1p"

[[columns]]
name = "click"
kind = "label"
"""


def toy_frame(rows: int = 100) -> pl.DataFrame:
    """Row i: user u<i % 7> ('once' in row 0), item i % 5, 4 tag patterns, history
    "<i+1 % 5>|<i+2 % 5>", price i % 4, label i % 2, and a column the schema ignores."""
    i = pl.col("i")
    return pl.DataFrame({"i": range(rows)}).select(
        user=pl.when(i == 0).then(pl.lit("once")).otherwise(pl.format("u{}", i % 7)),
        item=(i % 5).cast(pl.String),
        tags=pl.lit(pl.Series(["a|b", None, "c", "b|a|c"] * (rows // 4))),
        hist=pl.format("{}|{}", (i + 1) % 5, (i + 2) % 5),
        price=(i % 4).cast(pl.Float64),
        click=(i % 2).cast(pl.String),
        ignored=i,
    )


@pytest.fixture
def toy_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "schema.toml").write_text(SCHEMA_TOML)
    toy_frame().write_csv(folder / "toy.csv")
    return folder


def rows(ds) -> dict[str, list]:
    """Every row of `ds` as per-feature Python lists (jagged features as nested lists)."""
    batch = ds.batch(torch.arange(len(ds)))
    out = {k: [t.tolist() for t in v.to_dense()] for k, v in batch.sparse.to_dict().items()}
    return {**out, "dense": batch.dense.tolist(), "label": batch.labels.tolist()}


def test_toml_schema_dataset(toy_dir: Path, tmp_path: Path) -> None:
    splits = load_dataset(str(toy_dir), cache_dir=tmp_path / "cache")
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (80, 10, 10)
    specs = {f.name: f for f in splits.feature_specs()}
    assert list(specs) == ["user", "item", "tags", "hist"]
    assert [specs[n].pooling for n in specs] == ["sum", "sum", "sum", "none"]
    assert (
        specs["hist"].table == "item"
        and specs["hist"].cardinality == specs["item"].cardinality == 6
    )
    assert splits.vocab_sizes == {"user": 8, "item": 6, "tags": 4}  # 'once' is under min_count
    assert splits.dense_dim == 1
    everything = [rows(getattr(splits, s)) for s in ("train", "valid", "test")]
    users = [u for r in everything for u in r["user"]]
    assert sorted(users).count([0]) == 1  # only 'once' is OOV
    tags = [t for r in everything for t in r["tags"]]
    assert sorted(map(len, tags)) == [0] * 25 + [1] * 25 + [2] * 25 + [3] * 25
    # item ids "0".."4" -> 1..5; history "i+1|i+2" keeps its order
    for r in everything:
        assert all(h == [(i % 5) + 1, ((i + 1) % 5) + 1] for (i,), h in zip(r["item"], r["hist"]))


def test_dense_log1p_and_label_values(toy_dir: Path, tmp_path: Path) -> None:
    splits = load_dataset(str(toy_dir), cache_dir=tmp_path)
    dense = torch.cat([splits.train.dense, splits.valid.dense, splits.test.dense]).flatten()
    expected = torch.log1p(torch.tensor([0.0, 1.0, 2.0, 3.0])).float()
    expected[0] = 0.0
    assert torch.allclose(torch.unique(dense), expected)
    labels = torch.cat([splits.train.labels, splits.valid.labels, splits.test.labels])
    assert labels.sum() == 50 and set(labels.tolist()) == {0.0, 1.0}


def test_split_is_seeded(toy_dir: Path, tmp_path: Path) -> None:
    schema = Schema.from_toml(toy_dir / "schema.toml")
    a = read_dataset(schema, [toy_dir / "toy.csv"], tmp_path / "a")
    b = read_dataset(schema, [toy_dir / "toy.csv"], tmp_path / "b")
    other = Schema.from_dict({**schema.to_dict(), "seed": 4})
    c = read_dataset(other, [toy_dir / "toy.csv"], tmp_path / "c")
    assert rows(a.test) == rows(b.test)
    assert rows(a.test) != rows(c.test)


def test_parquet_and_tsv_match_csv(toy_dir: Path, tmp_path: Path) -> None:
    schema = Schema.from_toml(toy_dir / "schema.toml")
    csv = read_dataset(schema, [toy_dir / "toy.csv"], tmp_path)
    frame = toy_frame().with_columns(
        pl.col("tags").str.split("|").list.eval(pl.element().filter(pl.element() != ""))
    )
    frame.write_parquet(tmp_path / "toy.parquet")
    parquet = read_dataset(
        Schema.from_dict({**schema.to_dict(), "format": "parquet"}),
        [tmp_path / "toy.parquet"],
        tmp_path,
    )
    toy_frame().write_csv(tmp_path / "toy.tsv", separator="\t")
    tsv = read_dataset(
        Schema.from_dict({**schema.to_dict(), "format": "tsv"}), [tmp_path / "toy.tsv"], tmp_path
    )
    assert rows(csv.train) == rows(parquet.train) == rows(tsv.train)


def test_vocabulary_ids_and_round_trip(tmp_path: Path) -> None:
    vocab = Vocabulary.from_values(
        "v", pl.Series(["b", "a", "b", None, "c", "c", "c"]), min_count=2
    )
    assert vocab.values.to_list() == ["b", "c"] and vocab.size == 3
    ids = pl.select(vocab.encode(pl.lit(pl.Series(["c", "a", None, "b"])))).to_series()
    assert ids.to_list() == [2, 0, 0, 1]
    vocab.save(tmp_path / "v.parquet")
    loaded = Vocabulary.load("v", tmp_path / "v.parquet")
    assert loaded.values.to_list() == ["b", "c"] and loaded.counts.to_list() == [2, 3]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("u0,2,", "u0,2,x,", r"toy.csv, line 9: 8 fields separated by ',', expected 7"),
        ("3.0,1,7\n", "3.0,1\n", r"toy.csv, line 9: 6 fields separated by ',', expected 7"),
        ("\n", "\n\n", r"toy.csv, line 2: blank line inside the data"),
        (
            "1.0,1,1\n",
            "1.0,yes,1\n",
            r"toy.csv, line 3, column 'click': value 'yes', expected 0 or 1",
        ),
        ("1.0,1,1\n", "1.0,,1\n", r"toy.csv, line 3, column 'click': value None"),
        ("1.0,1,1\n", "cheap,1,1\n", r"line 3, column 'price': value 'cheap', expected a finite"),
        ("1.0,1,1\n", "inf,1,1\n", r"line 3, column 'price': value 'inf', expected a finite"),
        ("price", "cost", r"toy.csv: missing columns \['price'\]"),
    ],
)
def test_malformed_files_raise(
    toy_dir: Path, tmp_path: Path, old: str, new: str, message: str
) -> None:
    path = toy_dir / "toy.csv"
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(ValueError, match=message):
        load_dataset(str(toy_dir), cache_dir=tmp_path)


LABEL = '{name = "y", kind = "label"}'


@pytest.mark.parametrize(
    ("columns", "extra", "message"),
    [
        (LABEL, "size = 3", r"unknown keys \['size'\]"),
        ('{name = "a", kind = "weird"}', "", r"kind 'weird'"),
        ('{name = "a", kind = "dense"}', "", r"exactly one label column"),
        (LABEL + ', {name = "a", kind = "sequence", table = "b"}', "", r"shares table 'b'"),
        ('{name = "y", kind = "label", transform = "log1p"}', "", r"transform 'log1p'"),
        (LABEL, "split = [0.5, 0.1, 0.1]", r"summing to 1"),
        ('{name = "y", kind = "label", extra = 1}', "", r"extra"),
        (LABEL, "columns = 3", r"schema.toml: invalid schema"),
    ],
)
def test_bad_schemas_raise(tmp_path: Path, columns: str, extra: str, message: str) -> None:
    (tmp_path / "schema.toml").write_text(f'name = "x"\ncolumns = [{columns}]\n{extra}\n')
    with pytest.raises(ValueError, match=message):
        Schema.from_toml(tmp_path / "schema.toml")


def test_cache_is_reused(toy_dir: Path, tmp_path: Path, monkeypatch) -> None:
    first = load_dataset(str(toy_dir), cache_dir=tmp_path)
    monkeypatch.setattr(reader_module, "process", lambda *a: pytest.fail("cache not used"))
    assert rows(load_dataset(str(toy_dir), cache_dir=tmp_path).test) == rows(first.test)


def test_changed_source_or_schema_rebuilds(toy_dir: Path, tmp_path: Path) -> None:
    first = load_dataset(str(toy_dir), cache_dir=tmp_path)
    toy_frame().with_columns(click=pl.lit("1")).write_csv(toy_dir / "toy.csv")
    os.utime(toy_dir / "toy.csv", ns=(1, 1))
    changed = load_dataset(str(toy_dir), cache_dir=tmp_path)
    assert first.train.labels.mean() < 1 and changed.train.labels.mean() == 1
    assert len(list((tmp_path / "processed").iterdir())) == 2


def test_corrupt_cache_is_rebuilt(toy_dir: Path, tmp_path: Path) -> None:
    first = load_dataset(str(toy_dir), cache_dir=tmp_path)
    (entry,) = (tmp_path / "processed").iterdir()
    data = (entry / "train.parquet").read_bytes()
    (entry / "train.parquet").write_bytes(data[: len(data) // 2])
    again = load_dataset(str(toy_dir), cache_dir=tmp_path)
    assert rows(again.train) == rows(first.train)
    assert (entry / "train.parquet").read_bytes() == data


def test_failed_write_leaves_no_cache(toy_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def broken_save(self, directory: Path, key: str) -> None:
        (directory / "vocab").mkdir(parents=True)
        (directory / "train.parquet").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Processed, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        load_dataset(str(toy_dir), cache_dir=tmp_path)
    assert list((tmp_path / "processed").iterdir()) == []


def test_column_spec_rejects_table_on_dense() -> None:
    with pytest.raises(ValueError, match="only sparse columns share tables"):
        ColumnSpec("x", "dense", table="y")


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; expected one of \('movielens'"):
        load_dataset("nope")


def test_schema_docstring_example_parses(tmp_path: Path) -> None:
    text = schema_module.__doc__.split("::\n")[1]
    (tmp_path / "schema.toml").write_text(textwrap.dedent(text))
    schema = Schema.from_toml(tmp_path / "schema.toml")
    assert schema.quote_char is None and schema.label.name == "clicked"
    assert [c.name for c in schema.sparse] == ["user_id", "item_id", "hist_item_ids"]


def test_file_names_are_paths_not_patterns(toy_dir: Path, tmp_path: Path) -> None:
    """``toy[1].csv`` as a glob would read ``toy1.csv``: it must read itself."""
    (toy_dir / "toy.csv").rename(toy_dir / "toy[1].csv")
    toy_frame().with_columns(click=pl.lit("1")).write_csv(toy_dir / "toy1.csv")
    schema = Schema.from_toml(toy_dir / "schema.toml")
    splits = read_dataset(schema, [toy_dir / "toy[1].csv"], tmp_path)
    assert splits.train.labels.mean() < 1


def test_same_name_size_and_mtime_in_two_folders_are_two_entries(toy_dir: Path, tmp_path: Path) -> None:
    schema = Schema.from_toml(toy_dir / "schema.toml")
    other = tmp_path / "other"
    other.mkdir()
    toy_frame().with_columns(click=pl.lit("1")).write_csv(other / "toy.csv")  # same size, other labels
    assert (other / "toy.csv").stat().st_size == (toy_dir / "toy.csv").stat().st_size
    for path in (toy_dir / "toy.csv", other / "toy.csv"):
        os.utime(path, ns=(1, 1))
    first = read_dataset(schema, [toy_dir / "toy.csv"], tmp_path / "cache")
    second = read_dataset(schema, [other / "toy.csv"], tmp_path / "cache")
    assert first.train.labels.mean() < second.train.labels.mean()


def test_dataset_names_stay_inside_the_cache(toy_dir: Path, tmp_path: Path) -> None:
    schema_file = toy_dir / "schema.toml"
    schema_file.write_text(schema_file.read_text().replace('name = "toy"', 'name = "../../escaped"'))
    load_dataset(str(toy_dir), cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache" / "processed").iterdir()
    assert entry.name.startswith("_.._escaped-")
    assert not list(tmp_path.glob("escaped*")) and not list(tmp_path.glob("*/escaped*"))


def test_concurrent_builders_keep_one_valid_entry(toy_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Another builder publishes the same entry between our build and our rename."""
    real_rename, real_replace, raced = os.rename, os.replace, []

    def racing(real):
        def move(source, destination):
            if not raced and ".tmp-" in str(source):
                raced.append(True)
                import shutil

                shutil.copytree(source, destination)  # the other builder's finished entry
            real(source, destination)

        return move

    monkeypatch.setattr(os, "rename", racing(real_rename))
    monkeypatch.setattr(os, "replace", racing(real_replace))
    first = load_dataset(str(toy_dir), cache_dir=tmp_path)
    monkeypatch.undo()
    assert raced and rows(load_dataset(str(toy_dir), cache_dir=tmp_path).test) == rows(first.test)
    assert [p.name[0] for p in (tmp_path / "processed").iterdir()] == ["t"]  # no temporaries left


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"toy.csv: cannot read the header|no data rows"),
        ("user,item,tags,hist,price,click,ts\n", r"no data rows"),
    ],
)
def test_empty_files_are_refused(toy_dir: Path, tmp_path: Path, content: str, message: str) -> None:
    (toy_dir / "toy.csv").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_dataset(str(toy_dir), cache_dir=tmp_path)


def test_a_split_left_empty_is_refused(toy_dir: Path, tmp_path: Path) -> None:
    lines = (toy_dir / "toy.csv").read_text().splitlines(keepends=True)
    (toy_dir / "toy.csv").write_text("".join(lines[:4]))  # 3 rows split 80/10/10
    with pytest.raises(ValueError, match=r"3 rows split \[0.8, 0.1, 0.1\] leave the \['test'\] split\(s\) empty"):
        load_dataset(str(toy_dir), cache_dir=tmp_path)


def test_invalid_utf8_is_reported_with_its_line(toy_dir: Path, tmp_path: Path) -> None:
    lines = (toy_dir / "toy.csv").read_bytes().splitlines(keepends=True)
    lines[6] = lines[6].replace(b"u", b"\xff", 1)
    (toy_dir / "toy.csv").write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=r"toy.csv, line 7: invalid UTF-8"):
        load_dataset(str(toy_dir), cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("min_count = 1.5", r"column 'user': min_count = 1.5, expected an integer"),
        ("min_count = \"2\"", r"column 'user': min_count = '2', expected an integer"),
    ],
)
def test_ill_typed_column_values_are_refused(toy_dir: Path, text: str, message: str) -> None:
    schema_file = toy_dir / "schema.toml"
    schema_file.write_text(schema_file.read_text().replace("min_count = 2", text, 1))
    with pytest.raises(ValueError, match=message):
        Schema.from_toml(schema_file)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('has_header = "false"', r"has_header = 'false', expected true or false"),
        ('seed = "x"', r"seed = 'x', expected an integer"),
        ("seed = 1.5", r"seed = 1.5, expected an integer"),
        ('split = [0.8, 0.1, "0.1"]', r"split = .*expected a list of 3 values"),
    ],
)
def test_ill_typed_schema_values_are_refused(tmp_path: Path, extra: str, message: str) -> None:
    (tmp_path / "schema.toml").write_text(f'name = "x"\n{extra}\ncolumns = [{LABEL}]\n')
    with pytest.raises(ValueError, match=message):
        Schema.from_toml(tmp_path / "schema.toml")
