"""bench_methods: the JSON it writes, and naive versions that do the same work as embtab's methods."""

from __future__ import annotations

import json

import experiments  # noqa: F401  (OpenMP wait policy and malloc settings, as the command has them)

import pytest
import torch

import embtab
from embtab.config import EmbeddingSpec, FeatureSpec, MethodSpec, SparseOptimizer
from embtab.methods.full import FullTable
from embtab.methods.hashing_trick import HashingTrick
from embtab.methods.managed_collision import ManagedCollision
from embtab.methods.multi_hash import MultiHash
from embtab.methods.multiplex import Multiplexed
from embtab.methods.qr import QREmbedding
from embtab.shard import physical_weights
from embtab.testing import random_kjt
from experiments import bench_methods as bm

ROWS, DIM = 1000, 8
KEYS = ["C1", "C2", "C3"]


def tiny_spec(method: MethodSpec) -> EmbeddingSpec:
    return EmbeddingSpec(features=tuple(FeatureSpec(k, ROWS) for k in KEYS), dim=DIM, method=method)


def test_the_benchmark_writes_every_requested_method(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--fields", "3", "--rows", "1000", "--batch", "64", "--steps", "2", "--rounds", "1",
            "--warmup", "1", "--methods", "hashing_trick,qr", "--foundation-kinds", "sgd", "--out", str(out)]
    bm.main(argv)
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"hashing_trick", "qr"}
    for name, row in result["methods"].items():
        assert row["samples_per_s"] > 0 and row["naive_samples_per_s"] > 0 and row["full_samples_per_s"] > 0
        assert row["ratio_to_full"] > 0 and row["ratio_to_naive"] > 0
        assert 0 < row["bytes"] <= row["budget_bytes"] == result["budget_bytes"]
        assert row["fill"] >= row["min_fill"]
        assert row["spec"]["method"]["name"] == name
        assert EmbeddingSpec.from_dict(row["spec"]).method.name == name
        assert isinstance(row["goal_met"], bool)
    assert result["goals"]["ratio_to_full"] == {
        "hashing_trick": 0.85, "qr": 0.6, "multiplex": 0.85, "tt_rec": 0.5, "robe": 0.85, "dpq": 0.5, "mgqe": 0.5
    }
    assert result["goals"]["ratio_to_naive"] == 2.0
    assert result["results"]["sgd"]["speedup"] > 0  # the foundation's full-vs-EmbeddingBag figure


@pytest.mark.parametrize(
    "method",
    [
        FullTable(),
        HashingTrick(rows=97),
        MultiHash(rows=101),
        MultiHash(rows=100, combine="concat", shared=False),
        QREmbedding(collisions=30),
        QREmbedding(collisions=30, operation="add"),
        QREmbedding(collisions=30, operation="concat"),
        Multiplexed(rows=211),
        Multiplexed(rows=211, chunk_dim=4),
        ManagedCollision(rows=50),
    ],
    ids=repr,
)
def test_the_naive_version_computes_what_embtab_computes(method):
    spec = tiny_spec(method)
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(spec)
    naive = bm.NaiveMethodEmbeddings(spec)
    weights = physical_weights(tables)
    assert set(weights) == set(naive.tables) == set(tables.physical_tables)
    naive.load_weights(weights)
    for seed in range(2):  # twice: managed collisions' id maps evolve the same way
        kjt = random_kjt(spec.features, batch=16, seed=seed)  # bags of 0 to 3 ids: pooling counts
        torch.testing.assert_close(naive(kjt), tables(kjt).pooled.values(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", [HashingTrick(rows=97), QREmbedding(collisions=30)], ids=lambda m: m.name)
def test_a_training_step_updates_the_same_rows_the_same_way(method):
    """Fused SGD in embtab and torch's sparse SGD on the naive version: equal work, equal result."""
    spec = tiny_spec(method)
    step = bm.embtab_step(spec, SparseOptimizer("sgd", lr=0.5))
    naive = bm.torch_step(bm.NaiveMethodEmbeddings(spec), "sgd", lr=0.5)
    naive.model.load_weights(physical_weights(step.model))
    kjt = bm.criteo_like_batches(len(KEYS), ROWS, 32, 1, seed=3)[0]
    torch.testing.assert_close(naive.model(kjt), step.model(kjt).pooled.values())
    before = physical_weights(step.model)
    step(kjt)
    naive(kjt)
    after = physical_weights(step.model)
    assert any(not torch.equal(before[n], after[n]) for n in after)
    for name, module in naive.model.tables.items():
        torch.testing.assert_close(module.weight.detach(), after[name], rtol=1e-5, atol=1e-7)


def test_the_benchmarked_methods_are_the_registry_s():
    from dataclasses import dataclass

    from embtab.registry import MethodKind, methods_of_kind, register_method, unregister_method

    @register_method(MethodKind.COMPRESSION)
    @dataclass(frozen=True)
    class BenchTestHashing(HashingTrick):
        name = "bench_test_hashing"

    try:
        assert set(bm.bench_methods()) == set(
            methods_of_kind(MethodKind.COMPRESSION, MethodKind.EXPORT_COMPRESSED)
        )
        assert "bench_test_hashing" in bm.make_parser().parse_args([]).methods.split(",")
        template = bm.method_template("bench_test_hashing")
        assert isinstance(template, BenchTestHashing) and template.rows == bm.PLACEHOLDER_SIZE
    finally:
        unregister_method("bench_test_hashing")
    assert "bench_test_hashing" not in bm.bench_methods()
    assert bm.method_template("mgqe", rows=50).hot_ids == tuple(range(5))
    assert bm.method_template("qr", qr_operation="add").operation == "add"
    with pytest.raises(ValueError, match="unknown embedding method 'nope'"):
        bm.method_template("nope")
