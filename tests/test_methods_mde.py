"""Mixed-dimension embeddings: widths by popularity with a temperature, projected to the model's width."""

import pytest
import torch

import embtab
from embtab.budget import full_table_bytes, solve_budget
from embtab.methods.mde import MDE
from embtab.shard import allocated_bytes
from embtab.testing import random_kjt

FEATURES = (
    embtab.FeatureSpec("big", 100_000),
    embtab.FeatureSpec("mid", 1_000),
    embtab.FeatureSpec("small", 10),
    embtab.FeatureSpec("hist", 1_000, pooling="none", table="mid"),
)
OPTIMIZER = embtab.SparseOptimizer("rowwise_adagrad")


def test_widths_follow_popularity_rounded_to_multiples_of_four_and_capped():
    spec = embtab.EmbeddingSpec(features=FEATURES, dim=32, method=MDE(base_dim=32, alpha=0.5, reference_rows=10))
    tables = embtab.EmbeddingTables(spec)
    # 32 * (10 / n) ** 0.5: 0.32 -> 4 (the floor), 3.2 -> 4, 32
    assert {n: m.width for n, m in tables.methods.items()} == {"big": 4, "mid": 4, "small": 32}
    spec = embtab.EmbeddingSpec(features=FEATURES, dim=32, method=MDE(base_dim=400, alpha=0.3))
    widths = {n: m.width for n, m in embtab.EmbeddingTables(spec).methods.items()}
    assert widths == {"big": 12, "mid": 32, "small": 32}  # 12.6, 50.2 and 200 before rounding and the cap


def test_narrow_tables_are_projected_to_the_model_width():
    torch.manual_seed(0)
    spec = embtab.EmbeddingSpec(features=FEATURES, dim=16, method=MDE(base_dim=64, alpha=0.3))
    tables = embtab.EmbeddingTables(spec)
    out = tables(random_kjt(FEATURES, 8, 0))
    assert out.pooled.values().shape == (8, 48) and out.sequence["hist"].values().shape[1] == 16
    big = tables.methods["big"]
    assert big.projection.weight.shape == (16, big.width) and tables.methods["small"].projection is None


def test_budget_solves_base_dim_and_the_bytes_are_allocated():
    spec = embtab.EmbeddingSpec(features=FEATURES, dim=32)
    budget = full_table_bytes(spec, OPTIMIZER) // 4
    fit = solve_budget(spec, budget, OPTIMIZER, method=MDE(), min_fill=0.5)  # widths move in steps of 4
    assert 0.5 * budget <= fit.bytes <= budget
    tables = embtab.EmbeddingTables(fit.spec)
    real = allocated_bytes(embtab.fuse(tables, OPTIMIZER))
    own = sum(m.extra_bytes() for m in tables.methods.values())
    assert real["parameter_bytes"] + real["optimizer_bytes"] + own == fit.bytes
    with pytest.raises(ValueError, match=r"below the minimum of method 'mde'.*\(at base_dim=1\)"):
        solve_budget(spec, budget // 8, OPTIMIZER, method=MDE())


def test_bad_base_dim_names_the_table():
    spec = embtab.EmbeddingSpec(features=FEATURES[:1], dim=16, method=MDE(base_dim=0))
    with pytest.raises(ValueError, match=r"table 'big': base_dim must be an integer >= 1, got 0"):
        embtab.EmbeddingTables(spec)
