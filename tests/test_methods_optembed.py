"""OptEmbed's supernet: the row mask, its straight-through gradient, the threshold's SGD, width masks."""

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtab
from embtab.budget import solve_budget
from embtab.methods import SEARCH_METHODS, method_from_dict
from embtab.methods.optembed import OptEmbed, StraightThroughStep, ste_slope
from embtab.search.export import table_weights

FEATURES = (embtab.FeatureSpec("u", 4),)
SPEC = embtab.EmbeddingSpec(features=FEATURES, dim=4, method=OptEmbed(t_lr=0.1, alpha=0.5))
# L1 norms 0.2, 0.9, 1.2, 2.0 against a threshold of 0.5: z = -0.3 (pruned), 0.4, 0.7, 1.5
ROWS = torch.tensor(
    [[0.1, -0.1, 0.0, 0.0], [0.3, -0.3, 0.2, 0.1], [0.3, 0.3, -0.3, 0.3], [0.5, -0.5, 0.5, 0.5]]
)
Z = torch.tensor([-0.3, 0.4, 0.7, 1.5])


def one_id_each() -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(keys=["u"], values=torch.arange(4), lengths=torch.ones(4, dtype=torch.int64))


def tables_with_rows() -> embtab.EmbeddingTables:
    tables = embtab.EmbeddingTables(SPEC)
    with torch.no_grad():
        table_weights(tables)["u"].copy_(ROWS)
        tables.methods["u"].threshold.fill_(0.5)
    return tables


def test_estimator_slope_is_the_papers_piecewise_function():
    z = torch.tensor([-2.0, -1.0, -0.7, -0.4, -0.1, 0.0, 0.2, 0.4, 0.5, 1.0, 1.01])
    expected = torch.tensor([0.0, 0.4, 0.4, 0.4, 1.6, 2.0, 1.2, 0.4, 0.4, 0.4, 0.0])
    assert torch.allclose(ste_slope(z), expected, atol=1e-6)
    z.requires_grad_(True)
    StraightThroughStep.apply(z).sum().backward()
    assert torch.equal(StraightThroughStep.apply(z.detach()), (z.detach() > 0).float())
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_rows_under_the_threshold_output_zero_and_get_the_estimators_gradient():
    tables = tables_with_rows()
    tables.eval()  # full width: only the row mask acts
    out = tables(one_id_each()).pooled.values()
    keep = (Z > 0).float().unsqueeze(1)
    assert torch.equal(out, ROWS * keep)  # row 0 (||e||_1 = 0.2 < 0.5) is zero
    g = torch.arange(16, dtype=torch.float32).view(4, 4) / 10
    (out * g).sum().backward()
    method = tables.methods["u"]
    dots = (g * ROWS).sum(1)
    expected_rows = g * keep + (dots * ste_slope(Z)).unsqueeze(1) * torch.sign(ROWS)
    assert torch.allclose(table_weights(tables)["u"].grad, expected_rows, atol=1e-6)
    assert float(expected_rows[0].abs().sum()) > 0  # the pruned row still learns through z
    # SGD (lr 0.1) on the loss's gradient -sum(dots * slope) plus alpha * exp(-t)'s, -0.5 * exp(-0.5)
    grad = -(dots * ste_slope(Z)).sum() - 0.5 * torch.exp(torch.tensor(-0.5))
    assert float(method.threshold.detach()) == pytest.approx(0.5 - 0.1 * float(grad), abs=1e-6)
    assert method.threshold.grad is None  # consumed by the in-backward step


def test_fused_training_leaves_the_threshold_to_its_own_sgd():
    tables = tables_with_rows()
    dmp = embtab.fuse(tables, embtab.SparseOptimizer("sgd", lr=0.01))
    method = tables.methods["u"]
    assert all(p is not method.threshold for p in embtab.dense_parameters(dmp))
    with torch.no_grad():
        method.threshold.fill_(-5.0)  # every z > 1: only the regularizer moves t
    dmp(one_id_each()).pooled.values().sum().backward()
    expected = -5.0 + 0.1 * 0.5 * torch.exp(torch.tensor(5.0))
    assert float(method.threshold.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_training_samples_leading_widths_and_eval_uses_eval_width():
    torch.manual_seed(0)
    spec = embtab.EmbeddingSpec(features=(embtab.FeatureSpec("v", 50),), dim=16, method=OptEmbed())
    tables = embtab.EmbeddingTables(spec)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["v"], values=torch.arange(50).repeat(8), lengths=torch.ones(400, dtype=torch.int64)
    )
    out = tables(kjt).pooled.values()
    widths = (out != 0).sum(1)
    assert set(widths.tolist()) == {4, 8, 12, 16}  # per id, multiples of 4
    assert bool(((out != 0).int().diff(dim=1) <= 0).all())  # leading dimensions only
    tables.eval()
    tables.methods["v"].eval_width.fill_(8)
    assert set((tables(kjt).pooled.values() != 0).sum(1).tolist()) == {8}
    batch = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=spec.features, dim=16, method=OptEmbed(sampling="batch")))
    assert len(set((batch(kjt).pooled.values() != 0).sum(1).tolist())) == 1


def test_bad_settings_name_the_table_and_solve_budget_sets_the_export_target():
    with pytest.raises(ValueError, match=r"table 'u': width_step must be a multiple of 4 .* got 6"):
        embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=12, method=OptEmbed(width_step=6)))
    with pytest.raises(ValueError, match=r"table 'u': sampling must be one of .* got 'sample'"):
        embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=4, method=OptEmbed(sampling="sample")))
    spec = embtab.EmbeddingSpec(features=(embtab.FeatureSpec("w", 10_000),), dim=16)
    optimizer = embtab.SparseOptimizer("rowwise_adagrad")
    fit = solve_budget(spec, 50_000, optimizer, method=OptEmbed())
    assert fit.method == OptEmbed(budget_bytes=50_000, budget_optimizer="rowwise_adagrad")
    floor = 4 * 4 + 4 + 2 * 4 * 313 + 4 * 8  # the shared row + its state, remap, column index
    with pytest.raises(ValueError, match=rf"budget {floor - 1} bytes is below .* {floor} bytes"):
        solve_budget(spec, floor - 1, optimizer, method=OptEmbed())
    assert SEARCH_METHODS["optembed"] is OptEmbed and method_from_dict(fit.method.to_dict()) == fit.method
