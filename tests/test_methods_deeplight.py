"""DeepLight: the sparsity schedule against the paper's formula written out, each pruning step
against a naive sort of the magnitudes, a fused SGD step (pruned elements stay zero), pruning
inside the fused training loop, the CSR target of a budget, bad parameters, TOML round trip."""

from __future__ import annotations

import math

import pytest
import torch

import embtab
from embtab.config import LogicalTable
from embtab.fused_state import attach_row_reset
from embtab.methods import SEARCH_METHODS, DeepLight, method_from_dict
from embtab.search.sparse import csr_charge, csr_sparsity
from embtab.shard import physical_weights
from embtab.testing import assert_fused_step_matches_reference, random_kjt

DIM = 8
FEATURES = (
    embtab.FeatureSpec("user", 30),
    embtab.FeatureSpec("item", 40),
    embtab.FeatureSpec("hist", 40, pooling="none", table="item"),
)


def naive_schedule(step: int, target: float, warmup: int, every: int, damping: float, scale: float) -> float | None:
    """The sparsity a step prunes to (None: the step does not prune), from the paper's formula."""
    t = step - warmup
    if t <= 0 or t % every:
        return None
    return target * (1 - math.pow(damping, t / scale))


def naive_prune(weights: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the floor(sparsity * numel) smallest magnitudes, found by sorting them."""
    flat = weights.clone().reshape(-1)
    count = int(sparsity * flat.numel())
    if count:
        order = sorted(range(flat.numel()), key=lambda i: abs(float(flat[i])))
        flat[order[:count]] = 0.0
    return flat.reshape(weights.shape)


def test_schedule_is_the_papers_formula():
    spec = DeepLight(sparsity=0.8, warmup_steps=3, prune_every=4, damping=0.99, damping_steps=100.0)
    for step in range(1, 60):
        expected = naive_schedule(step, 0.8, 3, 4, 0.99, 100.0)
        assert spec.prunes_at(step) == (expected is not None)
        if expected is not None:
            assert spec.schedule(step) == pytest.approx(expected, rel=1e-12)
    assert spec.schedule(3) == 0.0 and spec.schedule(10**6) == pytest.approx(0.8)


def test_each_pruning_step_zeroes_the_smallest_magnitudes():
    """Unfused tables bound to their own weights: no optimizer, so only pruning changes them."""
    spec = DeepLight(sparsity=0.9, prune_every=2, damping=0.5, damping_steps=1.0)
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=spec)).train()
    attach_row_reset(tables)
    kjt = random_kjt(FEATURES, batch=4, seed=1)
    expected = physical_weights(tables)
    for step in range(1, 8):
        tables(kjt)
        target = naive_schedule(step, 0.9, 0, 2, 0.5, 1.0)
        if target is not None:
            expected = {name: naive_prune(w, target) for name, w in expected.items()}
        for name, weight in physical_weights(tables).items():
            torch.testing.assert_close(weight, expected[name], rtol=0, atol=0)
    zeros = (physical_weights(tables)["item"] == 0).float().mean()
    assert float(zeros) == pytest.approx(0.9 * (1 - 0.5**6), abs=1 / (40 * DIM))


def test_forward_and_fused_step_keep_pruned_elements_at_zero():
    spec = DeepLight(sparsity=0.5, prune_every=1000)  # no pruning in this step
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=spec))
    weights = embtab.fused_state.table_parameters(tables)
    with torch.no_grad():
        for w in weights.values():
            w[w.abs() < 0.5 * w.abs().max()] = 0.0  # a mask from an earlier pruning
    zero = {n: (w == 0).clone() for n, w in weights.items()}
    kjt = random_kjt(FEATURES, batch=6, seed=2, max_len=4)
    dmp, _ = assert_fused_step_matches_reference(
        tables, kjt, lambda w, t, ids: w[t][ids] * (w[t][ids] != 0)
    )
    for name, weight in physical_weights(dmp).items():
        assert bool((weight[zero[name]] == 0).all()) and bool((weight[~zero[name]] != 0).any())


def test_fused_training_prunes_towards_the_target():
    spec = DeepLight(sparsity=0.75, warmup_steps=1, prune_every=1, damping=0.5, damping_steps=1.0)
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=spec))
    dmp = embtab.fuse(tables, embtab.SparseOptimizer("sgd", lr=0.1))
    for step in range(1, 7):
        out = dmp(random_kjt(FEATURES, batch=8, seed=step))
        (out.pooled.values().square().sum() + out.sequence["hist"].values().sum()).backward()
        for name, weight in physical_weights(dmp).items():
            pruned = int(spec.schedule(step) * weight.numel())
            assert int((weight == 0).sum()) >= pruned, (name, step)
    assert float((physical_weights(dmp)["user"] == 0).float().mean()) == pytest.approx(0.75 * (1 - 0.5**5), abs=0.01)


def test_csr_sparsity_fits_the_budget():
    shapes = [(30, DIM), (40, DIM)]
    budget = 2000
    sparsity = csr_sparsity(shapes, budget)
    kept = sum(r * d - int(sparsity * r * d) for r, d in shapes)
    assert sum(csr_charge(r, 0) for r, _ in shapes) + kept * 8 <= budget + 8 * len(shapes)
    assert csr_sparsity(shapes, 10**9) == 0.0
    with pytest.raises(ValueError, match=r"budget 100 bytes is below the row pointers .* \(288 bytes\)"):
        csr_sparsity(shapes, 100)


@pytest.mark.parametrize(
    "spec,message",
    [
        (DeepLight(sparsity=1.0), r"table 'item': sparsity must be in \[0, 1\), got 1.0"),
        (DeepLight(prune_every=0), r"table 'item': prune_every must be an integer >= 1, got 0"),
        (DeepLight(warmup_steps=-1), r"table 'item': warmup_steps must be an integer >= 0, got -1"),
        (DeepLight(damping=1.5), r"table 'item': damping must be in \(0, 1\), got 1.5"),
        (DeepLight(damping_steps=0), r"table 'item': damping_steps must be > 0, got 0"),
    ],
)
def test_bad_parameters_name_the_table_and_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.build(LogicalTable("item", 40, DIM, FEATURES[1:], spec))


def test_unbound_training_says_how_to_bind():
    spec = DeepLight(sparsity=0.5, prune_every=1)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=spec)).train()
    with pytest.raises(RuntimeError, match="train it under embtab.fuse"):
        tables(random_kjt(FEATURES, batch=2, seed=0))


def test_registered_and_round_trip_through_toml():
    spec = method_from_dict({"name": "deeplight", "sparsity": 0.9, "damping_steps": 2.5})
    assert SEARCH_METHODS["deeplight"] is DeepLight and method_from_dict(spec.to_dict()) == spec
