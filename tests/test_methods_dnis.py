"""DNIS-style soft dimension selection: weights scale the dimensions, the budget prunes the smallest."""

import pytest
import torch

import embtab
from embtab.budget import solve_budget
from embtab.methods.dnis import DNIS
from embtab.search import export as ex
from embtab.shard import physical_weights
from embtab.testing import random_kjt

FEATURES = (
    embtab.FeatureSpec("user", 300),
    embtab.FeatureSpec("hist", 300, pooling="none", table="user"),
    embtab.FeatureSpec("genre", 20),
)
OPTIMIZER = embtab.SparseOptimizer("rowwise_adagrad")


def test_weights_scale_each_dimension_and_learn():
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=8, method=DNIS()))
    kjt = random_kjt(FEATURES, 16, 0)
    before = tables(kjt).pooled.values()
    alpha = torch.linspace(-1, 1, 8)
    with torch.no_grad():
        tables.methods["genre"].alpha.copy_(alpha)
    after = tables(kjt).pooled.values()
    assert torch.allclose(after[:, 8:], before[:, 8:] * alpha, atol=1e-7)
    after.sum().backward()
    assert tables.methods["genre"].alpha.grad.abs().sum() > 0


def test_budget_prunes_the_smallest_weights_and_the_export_matches():
    torch.manual_seed(0)
    spec = embtab.EmbeddingSpec(features=FEATURES, dim=16, method=DNIS())
    tables = embtab.EmbeddingTables(spec).eval()
    with torch.no_grad():
        for method in tables.methods.values():
            method.alpha.copy_(torch.randn(16))
    weights = physical_weights(tables)
    budget = solve_budget(spec, 10_000, OPTIMIZER).method
    target, counted = ex.budget_target(budget)
    assert (target, counted) == (10_000, OPTIMIZER)
    ex.set_shift(tables, ex.fit_shift(ex.table_scores(tables, weights), target, counted))
    plans = ex.plans(tables, weights)
    for name, plan in plans.items():
        alpha = tables.methods[name].alpha.abs()
        used = torch.zeros(16, dtype=torch.bool)
        used[plan.columns[(plan.values != 0).any(0)]] = True
        assert plan.kept == plan.keep.numel() and 0 < int(used.sum()) < 16  # no row pruned, some columns
        assert float(alpha[used].min()) > float(alpha[~used].max())
    compact = ex.build_compact(spec, plans)
    assert compact.memory_bytes(OPTIMIZER).total <= 10_000
    kjt = random_kjt(FEATURES, 16, 1)
    assert torch.allclose(compact(kjt).pooled.values(), tables(kjt).pooled.values(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"below the smallest export of these tables: \d+ bytes"):
        ex.fit_shift(ex.table_scores(tables, weights), 4_000, counted)
