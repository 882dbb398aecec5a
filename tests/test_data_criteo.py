"""Criteo Kaggle TSV: format, dense transform, missing values, split, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from data import load_criteo, load_dataset
from data.criteo import CATEGORICAL, DENSE


def criteo_line(label: str, dense: list[str], cats: list[str]) -> str:
    return "\t".join([label, *dense, *cats])


def write_criteo(path: Path, rows: int = 20) -> Path:
    """Rows in the Kaggle layout: row r has I1 = r - 2 (negatives too), I2 empty, other I = r,
    C1 = hex(r % 3), C2 empty, other C = hex(r), label r % 2."""
    lines = []
    for r in range(rows):
        dense = [str(r - 2), "", *[str(r)] * 11]
        cats = [f"{r % 3:08x}", "", *[f"{r:08x}"] * 24]
        lines.append(criteo_line(str(r % 2), dense, cats))
    path.write_text("\n".join(lines) + "\n")
    return path


def all_rows(splits) -> list:
    """One batch per split holding all of its rows."""
    return [ds.batch(torch.arange(len(ds))) for ds in (splits.train, splits.valid, splits.test)]


def test_criteo_layout_and_transforms(tmp_path: Path) -> None:
    splits = load_criteo(write_criteo(tmp_path / "train.txt"), cache_dir=tmp_path)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (16, 2, 2)
    assert [f.name for f in splits.feature_specs()] == list(CATEGORICAL)
    assert splits.train.dense_names == DENSE and splits.dense_dim == 13
    assert splits.vocab_sizes["C1"] == 4 and splits.vocab_sizes["C2"] == 1  # C2: only OOV
    for batch in all_rows(splits):
        r = torch.round(torch.expm1(batch.dense[:, 2])).long()  # I3 = r, so log1p(r) recovers r
        assert torch.allclose(
            batch.dense[:, 0], torch.where(r > 2, torch.log1p((r - 2).float()), 0.0)
        )
        assert batch.dense[:, 1].eq(0).all()  # missing -> 0
        assert torch.equal(batch.labels, (r % 2).float())
        c1 = batch.sparse["C1"].values()
        assert torch.equal(c1, (r % 3 + 1).to(c1.dtype))  # sorted hex values 0, 1, 2 -> ids 1, 2, 3
        assert batch.sparse["C2"].values().eq(0).all()
    rows = torch.cat([torch.round(torch.expm1(b.dense[:, 2])) for b in all_rows(splits)])
    assert sorted(rows.long().tolist()) == list(range(20))


def test_criteo_test_rows_unseen_in_train_are_oov(tmp_path: Path) -> None:
    splits = load_criteo(write_criteo(tmp_path / "train.txt"), cache_dir=tmp_path)
    test = splits.test.batch(torch.arange(len(splits.test)))
    assert test.sparse["C3"].values().eq(0).all()  # C3 = hex(row) is unique to each row


def test_criteo_folder_and_seed(tmp_path: Path) -> None:
    write_criteo(tmp_path / "train.txt")
    a = load_criteo(tmp_path, cache_dir=tmp_path)
    b = load_criteo(tmp_path, cache_dir=tmp_path, seed=1)
    assert not torch.equal(a.test.dense, b.test.dense)
    assert math.isclose(
        float(a.train.labels.sum() + a.valid.labels.sum() + a.test.labels.sum()), 10
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            criteo_line("1", ["1"] * 13, ["aa"] * 25),
            r"line 3: 39 fields separated by '\\t', expected 40",
        ),
        (
            criteo_line("x", ["1"] * 13, ["aa"] * 26),
            r"line 3, column 'label': value 'x', expected 0 or 1",
        ),
        (
            criteo_line("1", ["1"] * 12 + ["1e"], ["aa"] * 26),
            r"line 3, column 'I13': value '1e', expected a finite",
        ),
    ],
)
def test_criteo_malformed_lines(tmp_path: Path, line: str, message: str) -> None:
    path = write_criteo(tmp_path / "train.txt", rows=2)
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(ValueError, match=r"train.txt, " + message):
        load_criteo(path, cache_dir=tmp_path)


def test_load_dataset_by_name(tmp_path: Path) -> None:
    path = write_criteo(tmp_path / "train.txt")
    by_name = load_dataset(f"criteo:{path}", cache_dir=tmp_path, seed=2)
    assert torch.equal(by_name.test.dense, load_criteo(path, cache_dir=tmp_path, seed=2).test.dense)


def test_a_file_ending_with_a_blank_line_is_accepted(tmp_path: Path) -> None:
    path = write_criteo(tmp_path / "train.txt")
    path.write_text(path.read_text() + "\n")
    splits = load_criteo(path, cache_dir=tmp_path)
    assert len(splits.train) + len(splits.valid) + len(splits.test) == 20
