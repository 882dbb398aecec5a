"""Hashing trick (+ hot ids): rows against an independent hash, outputs and fused SGD updates
against per-id references from the physical weights, memory independent of the id space."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtab
from embtab.shard import physical_weights
from embtab.testing import random_kjt, rss_bytes
from embtab.config import LogicalTable
from embtab.hashing import hash_to_range, salt_of
from embtab.methods import METHODS, method_from_dict
from embtab.methods.frequency import hottest_ids
from embtab.methods.hashing_trick import HashingTrick

CARD = 1000
FEATURES = (
    embtab.FeatureSpec("item", CARD),
    embtab.FeatureSpec("recent", CARD, pooling="mean", table="item"),
    embtab.FeatureSpec("hist", CARD, pooling="none", table="item"),
    embtab.FeatureSpec("user", 300),
)
HOT = (3, 17, 999)






def reference_rows(table: str, ids: torch.Tensor, rows: int, salt: int, hot: tuple[int, ...]) -> torch.Tensor:
    """Rows straight from the spec: exclusive row rows + rank for hot ids, the salted hash otherwise."""
    exclusive = {i: rows + r for r, i in enumerate(sorted(hot))}
    hashed = hash_to_range(ids, rows, salt_of(table, salt))
    return torch.tensor([exclusive.get(int(i), int(h)) for i, h in zip(ids, hashed)], dtype=torch.int64)


def reference_output(kjt, features, vectors_of):
    """Pooled [B, sum widths] and per-sequence-feature values, computed bag by bag."""
    per_key, pooled, sequence = kjt.to_dict(), [], {}
    for feature in features:
        jt = per_key[feature.name]
        if feature.is_sequence:
            sequence[feature.name] = vectors_of(feature.table_name, jt.values())
            continue
        bags = []
        for ids in jt.to_dense():
            vectors = vectors_of(feature.table_name, ids)
            bag = vectors.sum(0) if len(ids) else vectors.new_zeros(vectors.shape[1])
            bags.append(bag / len(ids) if feature.pooling == "mean" else bag)
        pooled.append(torch.stack(bags))
    return torch.cat(pooled, 1), sequence


def build(rows: int = 64, hot: tuple[int, ...] = HOT, salt: int = 5) -> embtab.EmbeddingTables:
    """`item` (shared by a sum, a mean and a sequence feature) with hot ids; `user` hashed only."""
    torch.manual_seed(0)
    spec = embtab.EmbeddingSpec(
        features=FEATURES,
        dim=8,
        method=HashingTrick(rows=rows, salt=salt),
        table_methods=(("item", HashingTrick(rows=rows, salt=salt, hot_ids=hot)),),
    )
    return embtab.EmbeddingTables(spec)


def test_outputs_and_one_fused_sgd_step_match_a_per_id_reference():
    tables = build()
    assert {n: (t.rows, t.dim) for n, t in tables.physical_tables.items()} == {
        "item": (64 + 3, 8),
        "user": (64, 8),
    }
    weights = physical_weights(tables)
    kjt = random_kjt(FEATURES, batch=6, seed=1, max_len=4, hot_ids=HOT, hot_tables=("item",))
    hot_of = {"item": HOT, "user": ()}

    def rows_of(table: str, ids: torch.Tensor) -> torch.Tensor:
        return reference_rows(table, ids, 64, 5, hot_of[table])

    expected_pooled, expected_sequence = reference_output(
        kjt, FEATURES, lambda table, ids: weights[table][rows_of(table, ids)]
    )
    out = tables(kjt)
    assert out.pooled.keys() == ["item", "recent", "user"]
    torch.testing.assert_close(out.pooled.values(), expected_pooled)
    torch.testing.assert_close(out.sequence["hist"].values(), expected_sequence["hist"])

    # SGD on loss = sum of all outputs: a row moves by -lr * (its summed d loss / d vector),
    # 1 per occurrence in a sum bag or sequence, 1/len in a mean bag.
    dmp = embtab.fuse(tables, embtab.SparseOptimizer("sgd", lr=0.5))
    out = dmp(kjt)
    (out.pooled.values().sum() + out.sequence["hist"].values().sum()).backward()
    after = physical_weights(dmp)
    per_key = kjt.to_dict()
    for table in ("item", "user"):
        grad = torch.zeros(weights[table].shape[0])
        for feature in (f for f in FEATURES if f.table_name == table):
            jt = per_key[feature.name]
            share = torch.ones(len(jt.values()))
            if feature.pooling == "mean":
                share = 1.0 / torch.repeat_interleave(jt.lengths(), jt.lengths()).float()
            grad.index_add_(0, rows_of(table, jt.values()), share)
        changed = (after[table] != weights[table]).any(1)
        assert torch.equal(changed, grad != 0)
        assert bool((grad[:64] != 0).any())
        assert table == "user" or bool((grad[64:] != 0).all())  # every hot row was trained
        torch.testing.assert_close(after[table], weights[table] - 0.5 * grad.unsqueeze(1))


def test_remap_is_the_salted_hash_and_hot_ids_get_exclusive_rows():
    tables = build(rows=50, hot=(7, 2, 40))
    method = tables.methods["item"]
    ids = torch.arange(200, dtype=torch.int32)
    rows = method.remap(ids)
    assert rows.shape == (1, 200) and rows.dtype == torch.int64
    assert rows[0, [2, 7, 40]].tolist() == [50, 51, 52]  # rank in ascending id order
    cold = torch.ones(200, dtype=torch.bool)
    cold[[2, 7, 40]] = False
    assert torch.equal(rows[0, cold], hash_to_range(ids[cold].long(), 50, salt_of("item", 5)))
    assert int(rows[0, cold].max()) < 50
    # Same rows and salt, another table: the collisions differ.
    other = tables.methods["user"].remap(torch.arange(300))
    assert (other[0, :200] != rows[0]).float().mean() > 0.9


def test_hottest_ids_ranks_by_count_and_breaks_ties_by_id():
    counts = torch.tensor([5, 0, 9, 5, 1, 9, 0])
    assert hottest_ids(counts, 3) == (0, 2, 5)
    assert hottest_ids(counts, 4) == (0, 2, 3, 5)
    assert hottest_ids(counts, 100) == (0, 2, 3, 4, 5)  # unseen ids are never hot
    assert hottest_ids(counts, 0) == ()
    with pytest.raises(ValueError, match="1-d integer tensor"):
        hottest_ids(counts.float(), 2)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc")
def test_ten_billion_ids_build_and_train_in_little_memory():
    huge = 10**10
    features = (
        embtab.FeatureSpec("url", huge),
        embtab.FeatureSpec("urls", huge, pooling="none", table="url"),
    )
    before = rss_bytes()
    method = HashingTrick(rows=1000, hot_ids=(5, huge - 1))
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=features, dim=16, method=method))
    # The table, two hot ids and the exclusive rows' start: nothing scales with the 1e10 ids.
    assert tables.memory_bytes().total == 1002 * 16 * 4 + 2 * 8 + 8
    dmp = embtab.fuse(tables, embtab.SparseOptimizer("sgd", lr=0.1))
    ids = torch.tensor([huge - 1, 0, 123_456_789_012, 5, 2**62])  # beyond the cardinality: hashed too
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["url", "urls"], values=ids, lengths=torch.tensor([2, 1, 1, 1])
    )
    out = dmp(kjt)
    (out.pooled.values().sum() + out.sequence["urls"].values().sum()).backward()
    assert rss_bytes() - before < 64 * 2**20  # 1 byte per id would be 10 GB
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=["url", "urls"], values=torch.tensor([-3, 1]), lengths=torch.tensor([1, 1])
    )
    with pytest.raises(ValueError, match=r"'url': id -3 is out of range; expected 0 <= id"):
        dmp(bad)


@pytest.mark.parametrize(
    "spec,message",
    [
        (HashingTrick(rows=0), r"table 'item': rows must be an integer >= 1, got 0"),
        (HashingTrick(rows=4, hot_ids=(1, 1)), r"table 'item': hot_ids has duplicates"),
        (HashingTrick(rows=4, hot_ids=(1, 1000)), r"'item': hot id 1000 is out of range; expected 0 <= id < 1000"),
        (HashingTrick(rows=4, hot_ids=(-1,)), r"table 'item': hot id -1 is out of range"),
    ],
)
def test_bad_parameters_name_the_table_and_the_value(spec, message):
    table = LogicalTable("item", CARD, 8, FEATURES[:1], spec)
    with pytest.raises(ValueError, match=message):
        spec.build(table)


def test_registry_toml_round_trip_and_size_knob():
    spec = method_from_dict({"name": "hashing_trick", "rows": 10, "hot_ids": [4, 2]})
    assert spec == HashingTrick(rows=10, hot_ids=(4, 2)) and METHODS["hashing_trick"] is HashingTrick
    assert method_from_dict(spec.to_dict()) == spec
    assert HashingTrick.size_field == "rows" and HashingTrick.size_increasing
    sizes = []
    for rows in (10, 20, 40):
        bigger = dataclasses.replace(spec, **{HashingTrick.size_field: rows})
        tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=8, method=bigger))
        sizes.append(tables.memory_bytes().total)
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
