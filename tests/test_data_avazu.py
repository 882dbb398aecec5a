"""Avazu CSV: header, derived hour-of-day and weekday, label, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data import load_avazu
from data.avazu import CATEGORICAL, HEADER

# 2014-10-21 is a Tuesday (ISO weekday 2), 10-22 a Wednesday (3), 10-26 a Sunday (7)
HOURS = ["14102100", "14102105", "14102223", "14102601"]


def write_avazu(path: Path, rows: int = 20, header: tuple[str, ...] = HEADER) -> Path:
    """Rows in the Kaggle layout: id, click = r % 2, hour cycling through HOURS, categoricals."""
    lines = [",".join(header)]
    for r in range(rows):
        cats = ["1005", str(r % 2), "1fbe01fe", "f3845767", "28905ebd", "ecad2386", "7801e8d9",
                "07d7df22", "a99f214a", f"{r:08x}", "44956a24", "1", "2",
                str(15704 + r), "320", "50", "1722", "0", "35", "-1", "79"]  # fmt: skip
        lines.append(
            ",".join([str(10_000_949_000_000_000_000 + r), str(r % 2), HOURS[r % 4], *cats])
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_avazu_features_and_derived_time(tmp_path: Path) -> None:
    splits = load_avazu(
        write_avazu(tmp_path / "train.csv"), cache_dir=tmp_path, split=(1.0, 0.0, 0.0)
    )
    names = [f.name for f in splits.feature_specs()]
    assert names == ["hour_of_day", "weekday", *CATEGORICAL] and splits.dense_dim == 0
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (20, 0, 0)
    batch = splits.train.batch(torch.arange(20))
    hour, weekday = batch.sparse["hour_of_day"].values(), batch.sparse["weekday"].values()
    # vocabularies are sorted: hours "00" "01" "05" "23" -> 1..4, weekdays "2" "3" "7" -> 1..3
    pairs = set(zip(hour.tolist(), weekday.tolist()))
    assert pairs == {(1, 1), (3, 1), (4, 2), (2, 3)}
    assert splits.vocab_sizes["hour_of_day"] == 5 and splits.vocab_sizes["weekday"] == 4
    assert torch.equal(batch.labels, batch.sparse["banner_pos"].values().float() - 1)


def test_avazu_random_split(tmp_path: Path) -> None:
    splits = load_avazu(write_avazu(tmp_path / "train.csv"), cache_dir=tmp_path)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (16, 2, 2)
    test = splits.test.batch(torch.arange(2))
    assert test.sparse["device_ip"].values().eq(0).all()  # unique per row: unseen in train -> OOV


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("14102105", "1410210", r"line 3, column 'hour': value '1410210', expected a YYMMDDHH"),
        ("14102105", "14102125", r"line 3, column 'hour': value '14102125'"),  # hour 25
        ("14102105", "14133105", r"line 3, column 'hour': value '14133105'"),  # month 13
        (",device_ip,", ",device_addr,", r"missing columns \['device_ip'\]"),
        (",320,", ",320,9,", r"line 2: 25 fields separated by ',', expected 24"),
        ("0,14102100", "no,14102100", r"line 2, column 'click': value 'no'"),
    ],
)
def test_avazu_malformed(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = write_avazu(tmp_path / "train.csv", rows=4)
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(ValueError, match=r"train.csv[:,] " + message):
        load_avazu(path, cache_dir=tmp_path)


def test_a_file_ending_with_blank_lines_is_accepted(tmp_path: Path) -> None:
    path = write_avazu(tmp_path / "train.csv")
    path.write_text(path.read_text() + "\n\n")
    splits = load_avazu(path, cache_dir=tmp_path)
    assert len(splits.train) + len(splits.valid) + len(splits.test) == 20
