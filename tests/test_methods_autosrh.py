"""AutoSrh: frequency groups against a naive ranking, the forward ``e * alpha[group]`` and a fused
SGD step (the table's step and alpha's normalized, clipped, L1-penalized step written out), the
export's element mask against a naive threshold of ``|e * alpha|``, bad parameters, TOML."""

from __future__ import annotations

import pytest
import torch

import embtab
from embtab.config import LogicalTable
from embtab.methods import SEARCH_METHODS, AutoSrh, method_from_dict
from embtab.methods.autosrh import frequency_groups
from embtab.search import export as ex
from embtab.shard import physical_weights
from embtab.testing import assert_fused_step_matches_reference, random_kjt

DIM = 8
FEATURES = (
    embtab.FeatureSpec("user", 30),
    embtab.FeatureSpec("item", 40),
    embtab.FeatureSpec("hist", 40, pooling="none", table="item"),
)


def naive_groups(counts: list[int], groups: int) -> list[int]:
    """Rank ids by count; an id's group is where the first id of its count falls in equal parts."""
    ordered = sorted(counts)
    return [ordered.index(c) * groups // len(counts) for c in counts]


def test_frequency_groups_are_equal_parts_by_ascending_count_with_ties_together():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 9, (50,), generator=g)
    for groups in (1, 3, 6):
        ours = frequency_groups(counts, groups)
        assert ours.tolist() == naive_groups(counts.tolist(), groups)
        assert int(ours.max()) < groups
    assert frequency_groups(torch.arange(12), 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def _tables(spec: AutoSrh) -> embtab.EmbeddingTables:
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=spec))
    for name, method in tables.methods.items():
        counts = torch.randint(0, 20, (method.table.cardinality,), generator=torch.Generator().manual_seed(len(name)))
        method.set_groups(counts)
        with torch.no_grad():
            method.alpha.uniform_(0.2, 1.0, generator=torch.Generator().manual_seed(3))
    return tables


def test_forward_and_fused_step_match_the_formula_and_alphas_update():
    spec = AutoSrh(groups=3, alpha_lr=0.05, l1=0.01)
    tables = _tables(spec)
    groups = {n: m.group.long().clone() for n, m in tables.methods.items()}
    alphas = {n: m.alpha.detach().clone().requires_grad_() for n, m in tables.methods.items()}
    kjt = random_kjt(FEATURES, batch=6, seed=2, max_len=4)
    dmp, _ = assert_fused_step_matches_reference(
        tables, kjt, lambda w, t, ids: w[t][ids] * alphas[t][groups[t][ids]]
    )
    for name, alpha in alphas.items():
        g = alpha.grad + 0.01 * torch.sign(alpha.detach())
        g = g / (g.abs().mean(-1, keepdim=True) + 1e-8)
        expected = (alpha.detach() - 0.05 * g).clamp(0, 1)
        ours = next(p for key, p in dmp.named_parameters() if key.endswith(f"methods.{name}.alpha"))
        assert not torch.equal(expected, alpha.detach())
        torch.testing.assert_close(ours.detach(), expected, atol=1e-6, rtol=1e-5)


def test_export_keeps_the_largest_scaled_elements():
    tables = _tables(AutoSrh(groups=2))
    weights = physical_weights(tables)
    shift = 0.05
    ex.set_shift(tables, shift)
    plans = ex.plans(tables, weights)
    for name, method in tables.methods.items():
        scaled = weights[name] * method.alpha.detach()[method.group.long()]
        expected = torch.where(scaled.abs() > shift, scaled, torch.zeros(()))
        plan = plans[name]
        dense = torch.zeros_like(expected)
        dense[plan.keep.nonzero().squeeze(1).unsqueeze(1), plan.columns.unsqueeze(0)] = plan.values
        torch.testing.assert_close(dense, expected)
        rows, columns = method.scores([weights[name]])
        torch.testing.assert_close(rows, scaled.abs().amax(1))
        torch.testing.assert_close(columns, scaled.abs().amax(0))


@pytest.mark.parametrize(
    "spec,message",
    [
        (AutoSrh(groups=0), r"table 'item': groups must be an integer >= 1, got 0"),
        (AutoSrh(groups=200), r"table 'item': groups must be <= 127, got 200"),
        (AutoSrh(alpha_lr=0.0), r"table 'item': expected alpha_lr > 0 and l1 >= 0, got alpha_lr=0.0, l1=1e-05"),
        (AutoSrh(l1=-1.0), r"table 'item': expected alpha_lr > 0 and l1 >= 0, got alpha_lr=0.001, l1=-1.0"),
    ],
)
def test_bad_parameters_name_the_table_and_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.build(LogicalTable("item", 40, DIM, FEATURES[1:], spec))


def test_counts_of_the_wrong_shape_are_refused():
    method = AutoSrh().build(LogicalTable("item", 40, DIM, FEATURES[1:], AutoSrh()))
    with pytest.raises(ValueError, match=r"table 'item': counts of shape \(39,\); expected \(40,\)"):
        method.set_groups(torch.zeros(39, dtype=torch.int64))


def test_registered_and_round_trip_through_toml():
    spec = method_from_dict({"name": "autosrh", "groups": 4, "l1": 1e-4})
    assert SEARCH_METHODS["autosrh"] is AutoSrh and method_from_dict(spec.to_dict()) == spec
