"""Export of masked models (OptEmbed, PEP) to compact tables: same outputs, real bytes, budgets."""

import pytest
import torch
import embtab
from embtab.methods.optembed import OptEmbed
from embtab.methods.pep import PEP
from embtab.methods.pruned import PrunedTable, pack_mask
from embtab.search import export as ex
from embtab.shard import allocated_bytes as fused_allocated_bytes
from embtab.shard import physical_weights
from embtab.testing import random_kjt

FEATURES = (
    embtab.FeatureSpec("user", 300),
    embtab.FeatureSpec("item", 200),
    embtab.FeatureSpec("hist", 200, pooling="none", table="item"),
    embtab.FeatureSpec("genre", 10, pooling="mean"),
)
OPTIMIZER = embtab.SparseOptimizer("rowwise_adagrad", lr=0.1)
METHODS = {
    "optembed": OptEmbed(),
    "pep_dimension": PEP(granularity="dimension", init_threshold=-3.6),
    "pep_feature": PEP(granularity="feature", init_threshold=-3.6),
    "pep_feature_dim": PEP(granularity="feature_dim", init_threshold=-3.6),
    "pep_global": PEP(granularity="global", init_threshold=-3.6),
}


def masked(name: str) -> tuple[embtab.EmbeddingSpec, embtab.EmbeddingTables]:
    """Masked tables with some rows and (OptEmbed) some widths cut, in eval mode."""
    torch.manual_seed(0)
    spec = embtab.EmbeddingSpec(features=FEATURES, dim=8, method=METHODS[name])
    tables = embtab.EmbeddingTables(spec).eval()
    if name == "optembed":
        with torch.no_grad():
            for method, width in zip(tables.methods.values(), (4, 8, 4)):
                method.threshold.fill_(0.18)
                method.eval_width.fill_(width)
    return spec, tables


@pytest.mark.parametrize("name", sorted(METHODS))
def test_export_equals_the_masked_model_within_a_budget_and_its_bytes_are_allocated(name):
    spec, tables = masked(name)
    weights = physical_weights(tables)
    scores = ex.table_scores(tables, weights)
    budget = ex.bytes_at(scores, 0.0, OPTIMIZER) // 3
    shift = ex.fit_shift(scores, budget, OPTIMIZER)
    assert shift > 0 and ex.bytes_at(scores, shift, OPTIMIZER) <= budget
    ex.set_shift(tables, shift)
    plans = ex.plans(tables, weights)
    assert 0 < sum(p.kept for p in plans.values()) < 510
    compact = ex.build_compact(spec, plans)
    for seed in range(3):
        kjt = random_kjt(FEATURES, 32, seed)
        want, got = tables(kjt), compact(kjt)
        assert torch.allclose(got.pooled.values(), want.pooled.values(), atol=1e-6, rtol=0)
        assert torch.equal(got.sequence["hist"].values(), want.sequence["hist"].values())
    report = compact.memory_bytes(OPTIMIZER)
    assert report.total <= ex.bytes_at(scores, shift, OPTIMIZER) <= budget
    dmp = embtab.fuse(compact, OPTIMIZER)
    real = fused_allocated_bytes(dmp)
    own = sum(m.extra_bytes() for m in compact.methods.values())
    assert real["parameter_bytes"] + real["optimizer_bytes"] + own == report.total
    assert real["parameter_bytes"] == 4 * sum((p.kept + 1) * p.width for p in plans.values())


def test_a_smaller_shift_would_not_fit_and_a_tiny_budget_names_the_floor():
    _, tables = masked("optembed")
    scores = ex.table_scores(tables, physical_weights(tables))
    budget = ex.bytes_at(scores, 0.0, OPTIMIZER) // 2
    shift = ex.fit_shift(scores, budget, OPTIMIZER)
    below = torch.cat([s.rows for s in scores.values()])
    below = below[below < shift]
    assert ex.bytes_at(scores, float(below.max()), OPTIMIZER) > budget
    with pytest.raises(ValueError, match=r"budget 100 bytes is below the smallest export .* \d+ bytes"):
        ex.fit_shift(scores, 100, OPTIMIZER)


def test_remap_sends_kept_ids_to_their_rank_and_pruned_ids_to_the_shared_row():
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(1000, generator=g) < 0.3
    spec = embtab.EmbeddingSpec(
        features=(embtab.FeatureSpec("x", 1000),), dim=8, method=PrunedTable(kept=int(keep.sum()), width=4)
    )
    method = embtab.EmbeddingTables(spec).methods["x"]
    method.set_rows(keep)
    ids = torch.randint(0, 1000, (5000,), generator=g)
    expected = torch.where(keep[ids], torch.cumsum(keep.long(), 0)[ids] - 1, int(keep.sum()))
    assert torch.equal(method.remap(ids)[0], expected)
    bitmap, before = pack_mask(torch.ones(64, dtype=torch.bool))
    assert bitmap.tolist() == [-1, -1] and before.tolist() == [0, 32]
    with pytest.raises(ValueError, match=r"table 'x': row mask .* 1000 kept rows; expected .* 300 kept"):
        embtab.EmbeddingTables(embtab.EmbeddingSpec(features=spec.features, dim=8, method=PrunedTable(300, 4))).methods[
            "x"
        ].set_rows(torch.ones(1000, dtype=torch.bool))


def test_retraining_keeps_pruned_elements_and_the_shared_row_at_zero():
    spec, tables = masked("pep_dimension")
    weights = physical_weights(tables)
    plans = ex.plans(tables, weights)
    compact = ex.build_compact(spec, ex.rewind(plans, weights), freeze_zeros=True)
    before = {k: v.clone() for k, v in physical_weights(compact).items()}
    dmp = embtab.fuse(compact, embtab.SparseOptimizer("rowwise_adagrad", lr=0.5))
    for seed in range(3):
        out = dmp(random_kjt(FEATURES, 64, seed))
        (out.pooled.values().pow(2).sum() + out.sequence["hist"].values().sum()).backward()
    after = physical_weights(dmp)
    for name, weight in before.items():
        assert torch.equal(after[name][weight == 0], weight[weight == 0])
        assert not torch.equal(after[name], weight)  # the kept elements did train


def test_int8_export_is_close_and_smaller():
    spec, tables = masked("optembed")
    with torch.no_grad():
        for method in tables.methods.values():
            method.eval_width.fill_(8)
    compact = ex.build_compact(spec, ex.plans(tables, physical_weights(tables)))
    kjt = random_kjt(FEATURES, 32, 0)
    fp32, fp32_bytes = compact(kjt), ex.allocated_bytes(compact)
    ex.quantize(compact)
    int8 = compact(kjt)
    assert torch.allclose(int8.pooled.values(), fp32.pooled.values(), atol=2e-2)
    assert 0 < float((int8.pooled.values() - fp32.pooled.values()).abs().max())
    assert ex.allocated_bytes(compact) < fp32_bytes


def test_export_rejects_tables_without_a_mask():
    spec = embtab.EmbeddingSpec(features=FEATURES, dim=8)
    with pytest.raises(ValueError, match=r"table 'user' uses FullTableMethod, which has no learned mask"):
        ex.plans(embtab.EmbeddingTables(spec), {})
