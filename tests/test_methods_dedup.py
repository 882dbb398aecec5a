"""Dedup: the remap against the block-map formula, the merged blocks against a naive sequential
version of the benchmark's loop (visit blocks by 75th percentile, query an LSH index of the
visited ones, merge into the most similar duplicate, stop at the budget), the relaxed merges,
the budget solver's block counts, a fused SGD step, bad parameters, TOML round trip."""

from __future__ import annotations

import math

import pytest
import torch

import embtab
from embtab.budget import solve_budget
from embtab.config import LogicalTable
from embtab.methods import SEARCH_METHODS, Dedup, method_from_dict
from embtab.search.dedup import deduplicate, lsh_buckets, merged_weights
from embtab.testing import assert_fused_step_matches_reference, random_kjt

DIM = 4
FEATURES = (
    embtab.FeatureSpec("user", 30),
    embtab.FeatureSpec("item", 45),
    embtab.FeatureSpec("hist", 45, pooling="none", table="item"),
)


def naive_dedup(weights: torch.Tensor, spec: Dedup) -> list[int]:
    """The benchmark's sequential loop, one block at a time, with a dict as the LSH index;
    returns each block's stored-block index."""
    n, d = weights.shape
    b = spec.block_rows
    m = math.ceil(n / b)
    rows = [[weights[r].tolist() if r < n else None for r in range(k * b, (k + 1) * b)] for k in range(m)]
    flat = [[x for row in block if row is not None for x in row] for block in rows]
    padded = torch.zeros(m * b, d)
    padded[:n] = weights
    buckets = lsh_buckets(padded.reshape(m, -1), spec.lsh_width, spec.lsh_bands, spec.seed).tolist()
    order = sorted(range(m), key=lambda k: (float(torch.tensor(flat[k]).quantile(0.75)), k))
    index: dict[tuple[int, int], set[int]] = {}
    target = {}
    for k in order:
        if len(target) >= m - spec.blocks:
            break
        hits = sorted({j for band, h in enumerate(buckets[k]) for j in index.get((band, h), ())})
        best, best_sim = None, -1.0
        for j in hits:
            both = min(len(flat[k]), len(flat[j]))
            sim = sum(abs(x - y) <= spec.tolerance for x, y in zip(flat[k][:both], flat[j][:both])) / both
            if sim >= spec.similarity and sim > best_sim:
                best, best_sim = j, sim
        if best is not None:
            target[k] = best
        for band, h in enumerate(buckets[k]):
            index.setdefault((band, h), set()).add(k)
    stored: dict[int, int] = {}
    for k in order:
        root = k
        while root in target:
            root = target[root]
        if root == k:
            stored[k] = len(stored)
    out = []
    for k in range(m):
        root = k
        while root in target:
            root = target[root]
        out.append(stored[root])
    return out


def planted(n: int, d: int, groups: int, seed: int) -> torch.Tensor:
    """Rows whose blocks of 5 come in `groups` families of near-duplicates (noise of various sizes)."""
    g = torch.Generator().manual_seed(seed)
    families = torch.randn(groups, 5, d, generator=g)
    blocks = -(-n // 5)
    which = torch.randint(groups, (blocks,), generator=g)
    noise = torch.rand(blocks, 1, 1, generator=g) * 0.008 * torch.randn(blocks, 5, d, generator=g)
    return (families[which] + noise).reshape(-1, d)[:n]


@pytest.mark.parametrize("n,blocks", [(60, 5), (58, 7), (57, 4)])
def test_merged_blocks_match_the_sequential_loop(n, blocks):
    spec = Dedup(blocks=blocks, block_rows=5, tolerance=0.01, similarity=0.7, lsh_width=4.0, lsh_bands=6)
    weights = planted(n, DIM, groups=3, seed=n + blocks)
    plan = deduplicate(weights, spec)
    assert plan.block_map.tolist() == naive_dedup(weights, spec)
    assert plan.relaxed == 0 and plan.duplicates == -(-n // 5) - blocks
    merged = merged_weights(weights, plan, 5)
    padded = torch.cat([weights, torch.zeros(-n % 5, DIM)])
    assert merged.shape == (blocks * 5, DIM)
    for k, source in enumerate(plan.kept.tolist()):  # each stored block holds its source's rows
        torch.testing.assert_close(merged[5 * k : 5 * k + 5], padded[5 * source : 5 * source + 5])


def test_relaxed_merges_take_the_nearest_earlier_blocks_and_strict_ones_refuse():
    torch.manual_seed(0)
    weights = torch.randn(40, DIM)  # no near-duplicates at all
    spec = Dedup(blocks=3, block_rows=5, lsh_width=0.5, lsh_bands=4)
    plan = deduplicate(weights, spec)
    assert plan.duplicates == 0 and plan.relaxed == 5 and plan.kept.numel() == 3
    blocks = weights.reshape(8, -1)
    order = sorted(range(8), key=lambda k: (float(blocks[k].quantile(0.75)), k))
    rank = {k: r for r, k in enumerate(order)}
    nearest = {
        k: min((float(((blocks[k] - blocks[j]) ** 2).sum()), j) for j in range(8) if rank[j] < rank[k])
        for k in order[1:]
    }
    chosen = sorted(nearest, key=lambda k: nearest[k][0])[:5]
    target = {k: nearest[k][1] for k in chosen}

    def root(k):
        return root(target[k]) if k in target else k

    assert sorted(plan.kept.tolist()) == sorted(k for k in range(8) if k not in target)
    for k in range(8):
        assert plan.kept[plan.block_map[k]] == root(k)
    with pytest.raises(ValueError, match=r"only 0 of the 8 blocks pass the closeness test .* needs 5 merges"):
        deduplicate(weights, Dedup(blocks=3, block_rows=5, relax=False))


def test_remap_is_the_block_map_formula_and_a_fused_step_matches():
    spec = Dedup(blocks=4, block_rows=8)
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=spec))
    maps = {"user": torch.tensor([3, 0, 3, 1]), "item": torch.tensor([0, 2, 2, 1, 3, 0])}
    for name, block_map in maps.items():
        tables.methods[name].set_block_map(block_map)
        ids = torch.arange(tables.methods[name].table.cardinality)
        expected = torch.tensor([int(block_map[i // 8]) * 8 + i % 8 for i in ids.tolist()])
        assert tables.methods[name].remap(ids).squeeze(0).tolist() == expected.tolist()

    def vectors(weights, table, ids):
        rows = [int(maps[table][i // 8]) * 8 + i % 8 for i in ids.tolist()]
        return weights[Dedup.physical_name(table)][torch.tensor(rows, dtype=torch.int64)]

    assert_fused_step_matches_reference(tables, random_kjt(FEATURES, batch=6, seed=2, max_len=4), vectors)


def test_the_budget_solver_sizes_blocks_per_table():
    big = (embtab.FeatureSpec("item", 4000),)
    spec = embtab.EmbeddingSpec(features=big, dim=16, method=Dedup(block_rows=100))
    optimizer = embtab.SparseOptimizer("rowwise_adagrad")
    full = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=big, dim=16)).memory_bytes(optimizer).total
    fit = solve_budget(spec, full // 4, optimizer, min_fill=0.5)
    method = fit.spec.method_of("item")
    assert isinstance(method, Dedup) and method.blocks == 9  # 9 of 40 blocks, + the 40-entry map
    assert fit.bytes == 9 * 100 * (16 * 4 + 4) + 40 * 4 <= full // 4


@pytest.mark.parametrize(
    "spec,message",
    [
        (Dedup(blocks=0), r"table 'item': blocks must be an integer >= 1, got 0"),
        (Dedup(blocks=6, block_rows=8), r"table 'item': blocks must be <= 5 \(its 40 ids in blocks of 8\), got 6"),
        (Dedup(block_rows=0), r"table 'item': block_rows must be an integer >= 1, got 0"),
        (Dedup(similarity=1.5), r"table 'item': expected tolerance >= 0.*got tolerance=0.01, similarity=1.5"),
    ],
)
def test_bad_parameters_name_the_table_and_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.build(LogicalTable("item", 40, DIM, FEATURES[1:], spec))


def test_registered_and_round_trip_through_toml():
    spec = method_from_dict({"name": "dedup", "blocks": 3, "block_rows": 16, "relax": False})
    assert SEARCH_METHODS["dedup"] is Dedup and method_from_dict(spec.to_dict()) == spec
