"""embtab.shard on one process: sharding constraints, the plan printout, clear errors."""

import pytest
import torch

import embtab
from embtab.config import EmbeddingSpec, FeatureSpec
from embtab.methods.qr import QREmbedding
from embtab.shard import ShardingConstraints, format_plan

FEATURES = (FeatureSpec("user", 40), FeatureSpec("item", 50), FeatureSpec("hist", 50, pooling="none", table="item"))


def _tables(**method) -> embtab.EmbeddingTables:
    torch.manual_seed(0)
    return embtab.EmbeddingTables(EmbeddingSpec(features=FEATURES, dim=8, **method))


def test_constraints_name_tables_logically_or_physically():
    constraints = ShardingConstraints(
        sharding_types={"item": ("row_wise",), "user@qr1": ("column_wise",)},
        default_types=("table_wise", "data_parallel"),
    )
    assert constraints.types_of("item") == ("row_wise",)
    assert constraints.types_of("item@qr0") == ("row_wise",)
    assert constraints.types_of("user@qr1") == ("column_wise",)
    assert constraints.types_of("user@qr0") == ("table_wise", "data_parallel")


def test_bad_constraints_are_clear_errors():
    with pytest.raises(ValueError, match="'item'.*'rowwise'.*expected a non-empty subset"):
        ShardingConstraints(sharding_types={"item": ("rowwise",)})
    with pytest.raises(ValueError, match="unknown tables \\['itme'\\]"):
        embtab.fuse(
            _tables(),
            embtab.SparseOptimizer("sgd", lr=0.1),
            constraints=ShardingConstraints(sharding_types={"itme": ("table_wise",)}),
        )


def test_row_wise_pooled_tables_on_cpu_explain_the_limit():
    with pytest.raises(ValueError, match="pooled table 'user'.*not offer.*gloo"):
        embtab.fuse(
            _tables(),
            embtab.SparseOptimizer("sgd", lr=0.1),
            constraints=ShardingConstraints(sharding_types={"user": ("row_wise",)}),
        )


def test_the_plan_prints_one_line_per_physical_table_with_its_shards():
    dmp = embtab.fuse(
        _tables(method=QREmbedding(collisions=8, operation="add")),
        embtab.SparseOptimizer("sgd", lr=0.1),
        constraints=ShardingConstraints(
            sharding_types={"item": ("column_wise",)}, column_shard_width=4
        ),
    )
    lines = format_plan(dmp.plan).splitlines()
    assert [c.strip() for c in lines[0].split(" | ")][:3] == ["table", "sharding", "kernel"]
    by_table = {line.split(" | ")[0].strip(): line for line in lines[2:]}
    assert sorted(by_table) == ["item@qr0", "item@qr1", "user@qr0", "user@qr1"]
    assert "table_wise" in by_table["user@qr0"] and "0: 8x8 @ (0,0)" in by_table["user@qr0"]
    assert "column_wise" in by_table["item@qr1"]
    assert "0: 7x4 @ (0,0), 0: 7x4 @ (0,4)" in by_table["item@qr1"]


def test_rank_memory_bounds_the_plan():
    """A 100k x 16 table with SGD needs ~6.4 MB; one rank of 1 MB cannot hold it, 64 MB can."""
    from torchrec.distributed.planner.types import PlannerError

    spec = EmbeddingSpec(features=(FeatureSpec("user", 100_000),), dim=16)
    optimizer = embtab.SparseOptimizer("sgd", lr=0.1)
    with pytest.raises(PlannerError, match="insufficient storage(.|\n)*table user"):
        embtab.fuse(
            embtab.EmbeddingTables(spec), optimizer, constraints=ShardingConstraints(rank_memory_bytes=10**6)
        )
    dmp = embtab.fuse(
        embtab.EmbeddingTables(spec), optimizer, constraints=ShardingConstraints(rank_memory_bytes=64 * 10**6)
    )
    assert "100000x16" in format_plan(dmp.plan)


def test_importing_embtab_changes_no_global_warning_or_logging_filter():
    import importlib
    import logging
    import warnings

    import embtab.shard

    with warnings.catch_warnings():
        before = list(warnings.filters)
        importlib.reload(embtab.shard)
        assert warnings.filters == before
    assert not logging.getLogger("torchrec.distributed.planner.types").filters
    assert not any("DTensor" in str(f[1]) for f in warnings.filters)


def test_fuse_is_quiet(capfd):
    import warnings

    import embtab

    spec = embtab.EmbeddingSpec(features=(embtab.FeatureSpec("a", 50), embtab.FeatureSpec("b", 60)), dim=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embtab.fuse(embtab.EmbeddingTables(spec), embtab.SparseOptimizer("sgd", lr=0.1))
    assert not [w for w in caught if "DTensor" in str(w.message) or "TopologyFactory" in str(w.message)]
    assert "TopologyFactory" not in capfd.readouterr().err
