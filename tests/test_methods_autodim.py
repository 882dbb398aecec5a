"""AutoDim: the Gumbel-softmax mixture of projected, batch-normalized candidates against the
formula written out (training mode, seeded noise; eval mode through a fused SGD step with
alpha's Adam step), the annealed temperature, the chosen and budget-fitted widths against a
brute-force search, the refused budgets, bad parameters, TOML round trip."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import embtab
from embtab.budget import BelowMinimum, solve_budget
from embtab.config import LogicalTable
from embtab.methods import SEARCH_METHODS, AutoDim, method_from_dict
from embtab.methods.autodim import default_candidates, fit_widths, temperature
from embtab.testing import assert_fused_step_matches_reference, random_kjt

DIM = 16
FEATURES = (
    embtab.FeatureSpec("user", 30),
    embtab.FeatureSpec("item", 40),
    embtab.FeatureSpec("hist", 40, pooling="none", table="item"),
)


def naive_mixture(method, vectors, noise=None, tau=1.0, train=True):
    """sum_c softmax((log_softmax(alpha) + g) / tau)_c * BN(W_c v_c + b_c), BN written out."""
    alpha = method.alpha.detach()
    logits = torch.log_softmax(alpha, 0) + (noise if noise is not None else 0)
    p = torch.softmax(logits / tau, 0)
    out = 0
    for c, v in enumerate(vectors):
        x = v @ method.projections[c].weight.t() + method.projections[c].bias
        flat = x.reshape(-1, DIM)
        if train:
            flat = (flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-5)
        else:
            flat = flat / math.sqrt(1 + 1e-5)  # fresh running statistics: mean 0, variance 1
        out = out + p[c] * flat.reshape(x.shape)
    return out


def _method(spec: AutoDim):
    torch.manual_seed(0)
    method = spec.build(LogicalTable("item", 40, DIM, FEATURES[1:], spec))
    with torch.no_grad():
        method.alpha.copy_(torch.tensor([0.3, -0.2, 0.5]))
    return method


def test_training_mixture_matches_the_formula_with_seeded_gumbel_noise():
    method = _method(AutoDim(temperature_decay=0.1)).train()
    g = torch.Generator().manual_seed(1)
    vectors = [torch.randn(5, 3, w, generator=g) for w in (4, 8, 16)]
    for step in (1, 2, 3):
        torch.manual_seed(step)
        ours = method.combine(vectors)
        torch.manual_seed(step)
        u = torch.rand(3).clamp(1e-10, 1.0)
        expected = naive_mixture(method, vectors, -torch.log(-torch.log(u)), tau=max(0.01, 1 - 0.1 * step))
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert int(method.step) == 3 and temperature(20, 0.1) == 0.01 and temperature(5, 0.1) == pytest.approx(0.5)


def test_eval_forward_and_fused_step_match_the_formula_and_alpha_takes_an_adam_step():
    spec = AutoDim(alpha_lr=0.01)
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=spec)).eval()
    alphas = {n: m.alpha.detach().clone().requires_grad_() for n, m in tables.methods.items()}
    projections = {n: [(p.weight.detach().clone(), p.bias.detach().clone()) for p in m.projections] for n, m in tables.methods.items()}

    def vectors(weights, table, ids):
        p = torch.softmax(torch.log_softmax(alphas[table], 0), 0)
        out = 0
        for c, w in enumerate((4, 8, 16)):
            weight, bias = projections[table][c]
            x = weights[f"{table}@w{w}"][ids] @ weight.t() + bias
            out = out + p[c] * x / math.sqrt(1 + 1e-5)
        return out

    kjt = random_kjt(FEATURES, batch=6, seed=2, max_len=4)
    dmp, _ = assert_fused_step_matches_reference(tables, kjt, vectors)
    for name, alpha in alphas.items():
        expected = alpha.detach().clone().requires_grad_()
        expected.grad = alpha.grad.clone()
        torch.optim.Adam([expected], lr=0.01).step()
        ours = next(p for key, p in dmp.named_parameters() if key.endswith(f"methods.{name}.alpha"))
        assert not torch.equal(ours.detach(), alpha.detach())
        torch.testing.assert_close(ours.detach(), expected.detach(), atol=1e-6, rtol=1e-5)


def test_chosen_width_is_the_argmax_and_budget_widths_match_brute_force():
    method = _method(AutoDim())
    assert method.chosen_width() == 16 and default_candidates(16) == (4, 8, 16) and default_candidates(12) == (4, 8, 12)
    preferences = {
        "a": ((4, 8, 16), torch.tensor([0.0, 1.0, 2.0])),
        "b": ((4, 8, 16), torch.tensor([0.0, 2.0, 2.1])),
        "c": ((4, 8, 16), torch.tensor([1.0, 0.0, 0.0])),
    }
    rows = {"a": 100, "b": 300, "c": 50}

    def cost(name, width):
        return rows[name] * width * 4 + (width * 16 * 4 if width < 16 else 0)

    for budget in (30000, 20000, 12000, 9000):
        ours = fit_widths(preferences, cost, budget)
        assert sum(cost(n, w) for n, w in ours.items()) <= budget
        logp = {n: torch.log_softmax(l, 0) for n, (_, l) in preferences.items()}
        best = max(
            (combo for combo in itertools.product(range(3), repeat=3)
             if sum(cost(n, (4, 8, 16)[c]) for n, c in zip("abc", combo)) <= budget),
            key=lambda combo: sum(float(logp[n][c]) for n, c in zip("abc", combo)),
        )
        assert ours == {n: (4, 8, 16)[c] for n, c in zip("abc", best)}, budget
    with pytest.raises(ValueError, match=r"budget 100 bytes is below the narrowest widths' 7968 bytes"):
        fit_widths(preferences, cost, 100)


def test_budgets_below_every_table_at_width_4_are_refused_with_that_floor():
    spec = embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=AutoDim())
    optimizer = embtab.SparseOptimizer("rowwise_adagrad")
    floor = (30 + 40) * (4 * 4 + 4) + 2 * 4 * 16 * 4  # width-4 rows with state, two projections
    with pytest.raises(BelowMinimum, match=rf"expected a budget >= {floor}"):
        solve_budget(spec, floor - 1, optimizer, min_fill=0)
    assert solve_budget(spec, floor, optimizer, min_fill=0).bytes == floor


@pytest.mark.parametrize(
    "spec,message",
    [
        (AutoDim(candidates=(4, 6)), r"table 'item': candidates must be ascending distinct multiples of 4 in \[4, 16\], got \(4, 6\)"),
        (AutoDim(candidates=(8, 4)), r"got \(8, 4\)"),
        (AutoDim(candidates=(4, 32)), r"got \(4, 32\)"),
        (AutoDim(alpha_lr=0), r"table 'item': expected alpha_lr > 0 and temperature_decay >= 0, got alpha_lr=0,"),
    ],
)
def test_bad_parameters_name_the_table_and_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.build(LogicalTable("item", 40, DIM, FEATURES[1:], spec))


def test_registered_and_round_trip_through_toml():
    spec = method_from_dict({"name": "autodim", "candidates": [4, 16], "alpha_lr": 0.01})
    assert SEARCH_METHODS["autodim"] is AutoDim and spec.candidates == (4, 16)
    assert method_from_dict(spec.to_dict()) == spec
