"""PEP: element-wise soft thresholding with a learnable threshold at four granularities."""

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtab
from embtab.budget import solve_budget
from embtab.methods.pep import PEP
from embtab.search.export import table_weights

FEATURES = (embtab.FeatureSpec("u", 3),)
ROWS = torch.tensor([[0.5, -0.05, 0.2, -0.3], [0.01, 0.02, -0.03, 0.04], [1.0, -1.0, 0.0, 0.1]])


def tables(granularity: str, s0: float = -2.0) -> embtab.EmbeddingTables:
    spec = embtab.EmbeddingSpec(features=FEATURES, dim=4, method=PEP(granularity=granularity, init_threshold=s0))
    built = embtab.EmbeddingTables(spec)
    with torch.no_grad():
        table_weights(built)["u"].copy_(ROWS)
    return built


def ids() -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(keys=["u"], values=torch.arange(3), lengths=torch.ones(3, dtype=torch.int64))


@pytest.mark.parametrize("granularity", ["global", "dimension", "feature", "feature_dim"])
def test_soft_threshold_shrinks_every_element_by_sigmoid_of_s(granularity):
    built = tables(granularity)
    out = built(ids()).pooled.values()
    g = torch.sigmoid(torch.tensor(-2.0))  # 0.119
    assert torch.allclose(out, torch.sign(ROWS) * torch.relu(ROWS.abs() - g), atol=1e-6)
    assert int((out == 0).sum()) == 7  # the small row is pruned entirely, plus 0.0 and 0.1
    expected_tables = 2 if granularity.startswith("feature") else 1
    assert len(built.physical_tables) == expected_tables


def test_dimension_thresholds_take_an_adam_step_on_the_gradient_of_the_kept_elements():
    built = tables("dimension")
    s = built.methods["u"].s
    before = s.detach().clone()
    out = built(ids()).pooled.values()
    out.sum().backward()  # s steps inside the backward (its own Adam, lr 1e-3)
    g = torch.sigmoid(torch.tensor(-2.0))
    kept = (ROWS.abs() > g).float()
    # d/ds sign(v) (|v| - sigmoid(s)) = -sign(v) sigmoid'(s) on kept elements (+ L2 1e-5 * s);
    # Adam's first step is lr * sign(gradient)
    gradient = -(torch.sign(ROWS) * kept).sum(0) * g * (1 - g) + 1e-5 * before
    assert torch.allclose(s.detach() - before, -1e-3 * torch.sign(gradient), atol=1e-6)


def test_shift_prunes_more_and_scores_give_the_row_and_column_margins():
    built = tables("global").eval()
    method = built.methods["u"]
    rows, columns = method.scores([ROWS])
    margin = ROWS.abs() - torch.sigmoid(torch.tensor(-2.0))
    assert torch.allclose(rows, margin.amax(1)) and torch.allclose(columns, margin.amax(0))
    method.shift.fill_(0.3)
    out = built(ids()).pooled.values()
    assert torch.equal(out != 0, margin > 0.3)


def test_bad_granularity_names_the_table_and_budget_sets_the_target():
    with pytest.raises(ValueError, match=r"table 'u': granularity must be one of .* got 'row'"):
        tables("row")
    spec = embtab.EmbeddingSpec(features=(embtab.FeatureSpec("w", 5000),), dim=16)
    fit = solve_budget(spec, 40_000, embtab.SparseOptimizer("sgd"), method=PEP(), include_optimizer=False)
    assert fit.method == PEP(budget_bytes=40_000, budget_optimizer="") and fit.bytes == 40_000
