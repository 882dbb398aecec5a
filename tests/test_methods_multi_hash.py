"""Multi hashing (sum / concat, shared / per-probe tables, importance weights, hot ids): outputs and
fused SGD updates against per-id references from the physical weights; memory; bad parameters."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtab
from embtab.shard import physical_weights
from embtab.testing import assert_groups_match_per_table, random_kjt, reference_pooled, rss_bytes
from embtab.config import LogicalTable
from embtab.hashing import hash_to_range, salt_of
from embtab.methods import METHODS, method_from_dict
from embtab.methods.multi_hash import MultiHash

CARD = 1000
DIM = 8
FEATURES = (
    embtab.FeatureSpec("tags", CARD),  # a pooled-only table: pools in the kernel unless importance
    embtab.FeatureSpec("recent", CARD, pooling="mean", table="tags"),
    embtab.FeatureSpec("item", CARD),
    embtab.FeatureSpec("hist", CARD, pooling="none", table="item"),
)
HOT = (3, 17, 999)
TABLES = ("tags", "item")






def reference_probes(spec: MultiHash, table: str, ids: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(physical table, rows) per probe (and the importance table last), straight from the spec."""
    k, n_hot = spec.hashes, len(spec.hot_ids)
    rank = {i: r for r, i in enumerate(sorted(spec.hot_ids))}
    per_table = spec.rows if spec.shared else spec.rows // k
    probes = []
    for j in range(k):
        base = spec.rows + j * n_hot if spec.shared else per_table
        hashed = hash_to_range(ids, per_table, salt_of(table, spec.salt, j)).tolist()
        rows = [base + rank[int(i)] if int(i) in rank else h for i, h in zip(ids, hashed)]
        probes.append((table if spec.shared else f"{table}@h{j}", torch.tensor(rows, dtype=torch.int64)))
    if spec.importance:
        size = spec.importance_rows or spec.rows
        hashed = hash_to_range(ids, size, salt_of(table, spec.salt, "importance")).tolist()
        rows = [size + rank[int(i)] if int(i) in rank else h for i, h in zip(ids, hashed)]
        probes.append((f"{table}@importance", torch.tensor(rows, dtype=torch.int64)))
    return probes


def reference_vectors(
    spec: MultiHash, table: str, weights: dict[str, torch.Tensor], ids: torch.Tensor
) -> torch.Tensor:
    """e(x) = combine_j p_j(x) * E_j[h_j(x)], p = 1 + importance row (p = 1 without importance)."""
    probes = reference_probes(spec, table, ids)
    vectors = [weights[name][rows] for name, rows in probes[: spec.hashes]]
    if spec.importance:
        name, rows = probes[-1]
        p = 1 + weights[name][rows]
        vectors = [v * p[:, j : j + 1] for j, v in enumerate(vectors)]
    return torch.cat(vectors, 1) if spec.combine == "concat" else torch.stack(vectors).sum(0)


def reference_output(kjt, spec, weights):
    """Pooled [B, 3 * DIM] for tags (sum), recent (mean), item (sum), bag by bag; hist per id."""
    pooled = reference_pooled(FEATURES, kjt, lambda table, ids: reference_vectors(spec, table, weights, ids))
    return pooled, reference_vectors(spec, "item", weights, kjt["hist"].values())


CONFIGS = [
    MultiHash(rows=40, hashes=2),
    MultiHash(rows=40, hashes=2, combine="concat", shared=False, salt=3, hot_ids=HOT),
    MultiHash(rows=40, hashes=3, importance=True, importance_rows=16, hot_ids=HOT),
    MultiHash(rows=41, hashes=2, combine="concat", importance=True, shared=False),
]


def config_id(s: MultiHash) -> str:
    return f"{s.combine}-shared{s.shared}-imp{s.importance}-hot{len(s.hot_ids)}"


@pytest.mark.parametrize("spec", CONFIGS, ids=config_id)
def test_outputs_and_one_fused_sgd_step_match_a_per_id_reference(spec):
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=spec))
    weights = physical_weights(tables)
    kjt = random_kjt(FEATURES, batch=6, seed=1, max_len=4, hot_ids=HOT, hot_tables=TABLES)
    expected_pooled, expected_hist = reference_output(kjt, spec, weights)
    out = tables(kjt)
    torch.testing.assert_close(out.pooled.values(), expected_pooled)
    torch.testing.assert_close(out.sequence["hist"].values(), expected_hist)

    dmp = embtab.fuse(tables, embtab.SparseOptimizer("sgd", lr=0.5))
    out = dmp(kjt)
    (out.pooled.values().sum() + out.sequence["hist"].values().sum()).backward()
    after = physical_weights(dmp)
    # d loss / d (probe vector) summed per physical row: 1 per occurrence (1/len in a mean bag),
    # times the importance weight when there is one.
    grads = {name: torch.zeros(w.shape[0]) for name, w in weights.items()}
    per_key = kjt.to_dict()
    for feature in FEATURES:
        jt = per_key[feature.name]
        share = torch.ones(len(jt.values()))
        if feature.pooling == "mean":
            share = 1.0 / torch.repeat_interleave(jt.lengths(), jt.lengths()).float()
        for name, rows in reference_probes(spec, feature.table_name, jt.values()):
            grads[name].index_add_(0, rows, share)
    for name, grad in grads.items():
        changed = (after[name] != weights[name]).any(1)
        assert torch.equal(changed, grad != 0), name
        if not spec.importance:
            torch.testing.assert_close(after[name], weights[name] - 0.5 * grad.unsqueeze(1))
    # Importance weights do not commute with pooling: the pooled-only table is looked up per id.
    in_kernel = set(tables.ebc.embedding_bags) if tables.ebc is not None else set()
    assert bool(in_kernel) != spec.importance and all(n.startswith("tags") for n in in_kernel)
    for name in ("tags@importance", "item@importance") if spec.importance else ():
        # padding columns of the importance table are never read, never trained
        assert torch.equal(after[name][:, spec.hashes :], weights[name][:, spec.hashes :])


def test_physical_layout_per_option():
    def layout(spec):
        table = LogicalTable("item", CARD, 16, FEATURES, spec)
        return [(t.name, t.rows, t.dim) for t in spec.build(table).physical_tables]

    assert layout(MultiHash(rows=100, hashes=2)) == [("item", 100, 16)] * 2
    assert layout(MultiHash(rows=100, hashes=2, combine="concat", hot_ids=(1, 2))) == [("item", 104, 8)] * 2
    assert layout(MultiHash(rows=100, hashes=3, shared=False, hot_ids=(1,))) == [
        ("item@h0", 34, 16), ("item@h1", 34, 16), ("item@h2", 34, 16)
    ]
    assert layout(MultiHash(rows=100, hashes=5, importance=True))[-1] == ("item@importance", 100, 8)
    table = LogicalTable("item", CARD, 16, FEATURES, None)
    method = MultiHash(rows=100, hashes=2, importance=True).build(table)
    assert method.pooling_commutes is False and method.max_id is None
    assert MultiHash(rows=100).build(table).pooling_commutes


def test_probes_are_independent_hashes():
    method = MultiHash(rows=64, hashes=2).build(LogicalTable("item", CARD, 16, FEATURES, None))
    rows = method.remap(torch.arange(CARD))
    assert rows.shape == (2, CARD)
    # Ids colliding in probe 0 mostly separate in probe 1 (about 1/64 of pairs collide twice).
    same0 = rows[0].unsqueeze(0) == rows[0].unsqueeze(1)
    same1 = rows[1].unsqueeze(0) == rows[1].unsqueeze(1)
    assert (same0 & same1).sum() - CARD < 0.05 * (same0.sum() - CARD)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc")
def test_ten_billion_ids_build_and_train_in_little_memory():
    huge = 10**10
    features = (
        embtab.FeatureSpec("url", huge),
        embtab.FeatureSpec("urls", huge, pooling="none", table="url"),
    )
    before = rss_bytes()
    method = MultiHash(rows=1000, hashes=2, importance=True, hot_ids=(5, huge - 1))
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=features, dim=16, method=method))
    report = tables.memory_bytes()
    assert report.tables["url"].rows == 1004 and report.tables["url@importance"].rows == 1002
    dmp = embtab.fuse(tables, embtab.SparseOptimizer("sgd", lr=0.1))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["url", "urls"], values=torch.tensor([huge - 1, 0, 123_456_789_012, 5, 2**62]),
        lengths=torch.tensor([2, 1, 1, 1]),
    )
    out = dmp(kjt)
    (out.pooled.values().sum() + out.sequence["urls"].values().sum()).backward()
    assert rss_bytes() - before < 64 * 2**20  # 1 byte per id would be 10 GB


@pytest.mark.parametrize(
    "spec,message",
    [
        (MultiHash(rows=10, hashes=0), r"table 'item': hashes must be an integer >= 1, got 0"),
        (MultiHash(rows=2, hashes=3, shared=False), r"table 'item': rows must be an integer >= 3, got 2"),
        (MultiHash(rows=10, combine="max"), r"table 'item': combine must be one of \('sum', 'concat'\), got 'max'"),
        (MultiHash(rows=10, hashes=4, combine="concat"), r"table 'item': concat of 4 probes splits width 8 into 2"),
        (MultiHash(rows=10, importance=True, importance_rows=0), r"importance_rows must be an integer >= 1, got 0"),
        (MultiHash(rows=10, hot_ids=(5, 5)), r"table 'item': hot_ids has duplicates"),
    ],
)
def test_bad_parameters_name_the_table_and_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.build(LogicalTable("item", CARD, DIM, FEATURES, spec))


def test_registry_toml_round_trip_and_size_knob():
    spec = method_from_dict(
        {"name": "multi_hash", "rows": 12, "hashes": 3, "importance": True, "hot_ids": [1]}
    )
    assert METHODS["multi_hash"] is MultiHash and method_from_dict(spec.to_dict()) == spec
    assert MultiHash.size_field == "rows" and MultiHash.size_increasing
    sizes = []
    for rows in (12, 24, 48):
        bigger = dataclasses.replace(spec, **{MultiHash.size_field: rows})
        tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=bigger))
        sizes.append(tables.memory_bytes().total)
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


@pytest.mark.parametrize("shared,combine", [(True, "sum"), (False, "sum"), (True, "concat")])
def test_like_tables_combined_in_one_call_match_the_per_table_path(shared, combine):
    """Three pooled multi-hash tables of two features each form one group: one combine on their
    stacked probes; outputs and a fused SGD step equal the tables combined one by one."""
    features = tuple(
        embtab.FeatureSpec(name, CARD, table=None if len(name) == 1 else name[0])
        for name in ("a", "a2", "b", "b2", "c", "c2")
    )
    method = MultiHash(rows=40, hashes=2, shared=shared, combine=combine, hot_ids=HOT)
    spec = embtab.EmbeddingSpec(features=features, dim=DIM, method=method)
    assert_groups_match_per_table(spec, {"a", "b", "c"}, max_len=3)
