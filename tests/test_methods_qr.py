"""QR / k-partition compositional embeddings: partition sizes, exact int64 mixed-radix remap,
outputs (multi-hot mult pooled per id, not pooled first) and fused SGD updates against per-id
references from the physical weights; bad parameters; the size knob."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtab
from embtab.shard import physical_weights
from embtab.testing import assert_groups_match_per_table, random_kjt, reference_pooled
from embtab.config import LogicalTable
from embtab.methods import METHODS, method_from_dict
from embtab.methods.qr import QREmbedding, ceil_root, init_bound, partition_sizes

CARD = 1000
DIM = 8
FEATURES = (
    embtab.FeatureSpec("tags", CARD),  # a pooled-only table: add / concat pool in the fused kernel
    embtab.FeatureSpec("tags_mean", CARD, pooling="mean", table="tags"),
    embtab.FeatureSpec("item", CARD),
    embtab.FeatureSpec("hist", CARD, pooling="none", table="item"),
)






def digits(i: int, sizes: tuple[int, ...]) -> list[int]:
    """Mixed-radix digits of `i` in Python ints: p_j = floor(i / M_j) mod m_j (last digit unreduced)."""
    out, radix = [], 1
    for j, size in enumerate(sizes):
        digit = i // radix
        out.append(digit if j == len(sizes) - 1 else digit % size)
        radix *= size
    return out


def reference_vectors(spec: QREmbedding, table: str, weights, ids: torch.Tensor) -> torch.Tensor:
    sizes = partition_sizes(CARD, spec.collisions, spec.partitions)
    rows = torch.tensor([digits(int(i), sizes) for i in ids], dtype=torch.int64).reshape(len(ids), len(sizes))
    parts = [weights[f"{table}@qr{j}"][rows[:, j]] for j in range(len(sizes))]
    if spec.operation == "concat":
        return torch.cat(parts, 1)
    return math.prod(parts[1:], start=parts[0]) if spec.operation == "mult" else sum(parts[1:], parts[0])


def test_partition_sizes_cover_the_ids_with_near_equal_digits():
    assert partition_sizes(1000, 30, 2) == (30, 34)
    assert partition_sizes(1000, 10, 3) == (10, 10, 10)
    assert partition_sizes(1000, 7, 3) == (7, 12, 12)  # 143 quotients -> 12 x 12
    assert partition_sizes(1000, 4, 4) == (4, 7, 6, 6)  # 250 -> 7 (7**3 >= 250), 36 -> 6, 6
    assert partition_sizes(5, 10, 2) == (5, 1)  # fewer ids than collisions: no empty rows
    for n, c, k in ((1000, 4, 4), (99991, 17, 3), (10**12, 1000, 3)):
        assert math.prod(partition_sizes(n, c, k)) >= n
    assert [ceil_root(x, 3) for x in (1, 8, 9, 27, 28, 10**30 + 1)] == [1, 2, 3, 3, 4, 10**10 + 1]


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_init_bound_gives_the_full_tables_variance(operation):
    n, k = 10_000, 3
    a = init_bound(operation, n, k)
    g = torch.Generator().manual_seed(0)
    parts = (torch.rand(k, 200_000, generator=g, dtype=torch.float64) * 2 - 1) * a
    combined = {"mult": parts.prod(0), "add": parts.sum(0), "concat": parts.flatten()}[operation]
    assert math.isclose(float(combined.var()), 1 / (3 * n), rel_tol=0.03)


@pytest.mark.parametrize("collisions,partitions", [(30, 2), (7, 3), (4, 4)])
def test_remap_is_a_mixed_radix_bijection(collisions, partitions):
    table = LogicalTable("item", CARD, DIM, FEATURES[2:], None)
    method = QREmbedding(collisions, partitions=partitions).build(table)
    rows = method.remap(torch.arange(CARD, dtype=torch.int32))
    sizes = [t.rows for t in method.physical_tables]
    assert rows.dtype == torch.int64 and rows.shape == (partitions, CARD)
    assert all(int(rows[j].max()) < size and int(rows[j].min()) >= 0 for j, size in enumerate(sizes))
    assert torch.unique(rows.t(), dim=0).shape[0] == CARD  # unique digit tuples: a bijection
    assert rows.t().tolist() == [digits(i, tuple(sizes)) for i in range(CARD)]
    assert method.max_id == CARD


def test_large_ids_use_exact_int64_floor_division():
    n = 2**62
    for partitions in (2, 3):
        method = QREmbedding(3, partitions=partitions).build(LogicalTable("big", n, DIM, FEATURES[2:], None))
        ids = torch.tensor([n - 1, 2**53 + 1, 3 * 2**55 + 2, 0])
        sizes = tuple(t.rows for t in method.physical_tables)
        assert method.remap(ids).t().tolist() == [digits(int(i), sizes) for i in ids]


@pytest.mark.parametrize("operation,partitions", [("mult", 2), ("add", 2), ("concat", 2), ("mult", 3)])
def test_outputs_and_one_fused_sgd_step_match_a_per_id_reference(operation, partitions):
    torch.manual_seed(0)
    spec = QREmbedding(collisions=10, operation=operation, partitions=partitions)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=spec))
    pooled_in_kernel = set(tables.ebc.embedding_bags) if tables.ebc is not None else set()
    expected_in_kernel = set() if operation == "mult" else {f"tags@qr{j}" for j in range(partitions)}
    assert pooled_in_kernel == expected_in_kernel  # mult combines per id, then pools
    weights = physical_weights(tables)
    kjt = random_kjt(FEATURES, batch=6, seed=2, max_len=4)
    out = tables(kjt)
    expected = reference_pooled(FEATURES, kjt, lambda table, ids: reference_vectors(spec, table, weights, ids))
    torch.testing.assert_close(out.pooled.values(), expected)
    hist = kjt.to_dict()["hist"].values()
    torch.testing.assert_close(out.sequence["hist"].values(), reference_vectors(spec, "item", weights, hist))
    if operation == "mult" and partitions == 2:  # the test tells per-id from pool-first (DLRM bug)
        bag = kjt.to_dict()["tags"].to_dense()
        ids = max(bag, key=len)
        q, r = weights["tags@qr1"][ids // 10], weights["tags@qr0"][ids % 10]
        assert len(ids) > 1 and not torch.allclose((q * r).sum(0), q.sum(0) * r.sum(0))

    dmp = embtab.fuse(tables, embtab.SparseOptimizer("sgd", lr=0.5))
    out = dmp(kjt)
    (out.pooled.values().sum() + out.sequence["hist"].values().sum()).backward()
    after = physical_weights(dmp)
    sizes = partition_sizes(CARD, 10, partitions)
    grads = {name: torch.zeros(w.shape[0]) for name, w in weights.items()}
    for feature in FEATURES:
        jt = kjt.to_dict()[feature.name]
        share = torch.ones(len(jt.values()))
        if feature.pooling == "mean":
            share = 1.0 / torch.repeat_interleave(jt.lengths(), jt.lengths()).float()
        rows = torch.tensor([digits(int(i), sizes) for i in jt.values()], dtype=torch.int64)
        for j in range(partitions):
            grads[f"{feature.table_name}@qr{j}"].index_add_(0, rows[:, j], share)
    for name, grad in grads.items():
        assert torch.equal((after[name] != weights[name]).any(1), grad != 0), name
        if operation != "mult":  # linear combine: d loss / d row is the summed share
            torch.testing.assert_close(after[name], weights[name] - 0.5 * grad.unsqueeze(1))


@pytest.mark.parametrize(
    "spec,message",
    [
        (QREmbedding(0), r"table 'item': collisions must be an integer >= 1, got 0"),
        (QREmbedding(4, partitions=1), r"table 'item': partitions must be an integer >= 2, got 1"),
        (QREmbedding(4, operation="max"), r"table 'item': operation must be one of \('mult', 'add', 'concat'\), got 'max'"),
        (QREmbedding(4, operation="concat", partitions=3), r"table 'item': concat of 3 partitions splits width 8 into 2.67"),
        (QREmbedding(4, operation="concat", partitions=4), r"splits width 8 into 2; expected dim / partitions"),
    ],
)
def test_bad_parameters_name_the_table_and_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.build(LogicalTable("item", CARD, DIM, FEATURES[2:], spec))


def test_out_of_range_ids_are_rejected_and_size_knob_decreases_bytes():
    spec = method_from_dict({"name": "qr", "collisions": 2, "operation": "add"})
    assert METHODS["qr"] is QREmbedding and method_from_dict(spec.to_dict()) == spec
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=spec))
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in FEATURES],
        values=torch.tensor([1, 2, CARD, 3]),
        lengths=torch.ones(4, dtype=torch.int64),
    )
    with pytest.raises(ValueError, match=r"'item': id 1000 is out of range; expected 0 <= id < 1000"):
        tables(bad)
    assert QREmbedding.size_field == "collisions" and not QREmbedding.size_increasing
    sizes = []
    for collisions in (2, 4, 8, 16, 31):  # bytes fall with collisions up to about sqrt(n)
        smaller = dataclasses.replace(spec, **{QREmbedding.size_field: collisions})
        tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=smaller))
        sizes.append(tables.memory_bytes().total)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 5


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
@pytest.mark.parametrize("max_len,one_id_each", [(1, True), (1, False), (3, False)])
def test_like_tables_combined_in_one_call_match_the_per_table_path(operation, max_len, one_id_each):
    """Three pooled QR tables form one group (one combine on stacked columns); the outputs and a
    fused SGD step equal the same tables combined one by one, for bags of exactly one id (the
    combined rows are the bags), and for empty and multi-id bags (pooled after the combine)."""
    features = tuple(embtab.FeatureSpec(f"g{i}", CARD, required=one_id_each) for i in range(3))
    spec = embtab.EmbeddingSpec(features=features, dim=DIM, method=QREmbedding(10, operation=operation))
    assert_groups_match_per_table(spec, {"g0", "g1", "g2"}, max_len=max_len)
