"""bench_peers: the batches FuxiCTR's DIN receives hold exactly our batch, in FuxiCTR's layout."""

from __future__ import annotations

import experiments  # noqa: F401  (OpenMP wait policy and malloc settings, as the command has them)

import importlib.util

import pytest
import torch
from torchrec import KeyedJaggedTensor

from data.batch import Batch
from experiments import bench_peers as bp

KEYS = [*bp.USER_FEATURES, *bp.ITEM_FEATURES, *bp.HISTORY_FEATURES]


def movielens_like_batch() -> Batch:
    """Two samples: histories of 3 and 1 items (genres aligned with them)."""
    pooled = {"user_id": [4, 9], "gender": [1, 2], "age": [30, 41], "occupation": [0, 5],
              "item_id": [7, 8], "item_genre": [2, 3]}
    history = {"hist_item_ids": [[11, 12, 13], [14]], "hist_genres": [[1, 2, 1], [3]]}
    values = [v for k in KEYS[:6] for v in pooled[k]]
    values += [v for k in KEYS[6:] for row in history[k] for v in row]
    lengths = [1] * 12 + [len(row) for k in KEYS[6:] for row in history[k]]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=KEYS, values=torch.tensor(values), lengths=torch.tensor(lengths)
    )
    return Batch(sparse=kjt, dense=torch.empty(2, 0), labels=torch.tensor([1.0, 0.0]))


def test_fuxictr_inputs_put_the_history_first_the_candidate_last_and_shift_ids_past_padding():
    batch_dict, item_dict, mask = bp.fuxictr_inputs(movielens_like_batch(), history_len=4)
    assert batch_dict["user_id"].tolist() == [5, 10] and batch_dict["occupation"].tolist() == [1, 6]
    assert batch_dict["label"].tolist() == [1.0, 0.0]
    assert item_dict["item_id"].tolist() == [[12, 13, 14, 0, 8], [15, 0, 0, 0, 9]]
    assert item_dict["item_genre"].tolist() == [[2, 3, 2, 0, 3], [4, 0, 0, 0, 4]]
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False]]


@pytest.mark.skipif(importlib.util.find_spec("fuxictr") is not None, reason="FuxiCTR is installed here")
def test_without_fuxictr_the_benchmark_stops_with_what_to_install(tmp_path):
    with pytest.raises(SystemExit, match="needs FuxiCTR 2.3.10 on PYTHONPATH"):
        bp.fuxictr_din({k: 10 for k in KEYS}, tmp_path)
