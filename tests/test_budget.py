"""Byte budgets: every registered method solved for a budget, checked as counted and as allocated."""

import math
import re
import resource

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtab
from embtab.methods.base import SizedSpec
from embtab.budget import (
    AboveMaximum, BelowMinimum, BudgetError, budget_range, compression_ratio, full_table_bytes, solve_budget, spec_bytes,
)
from embtab.methods import METHODS
from embtab.methods.multiplex import Multiplexed
from embtab.shard import allocated_bytes

# Required parameters other than the size knob (which the solver sets), per registered method.
REQUIRED: dict[str, dict] = {"multiplex": {"chunk_dim": 4}, "dhe": {"hidden": 128, "layers": 1}}

FEATURES = (
    embtab.FeatureSpec("user", 20_000),
    embtab.FeatureSpec("item", 8_000),
    embtab.FeatureSpec("hist", 8_000, pooling="none", table="item"),
    embtab.FeatureSpec("city", 3_000),
)
SPEC = embtab.EmbeddingSpec(features=FEATURES, dim=8)
OPTIMIZER = embtab.SparseOptimizer("rowwise_adagrad", lr=0.1)


def method_spec(name: str) -> embtab.MethodSpec:
    cls = METHODS[name]
    kwargs = dict(REQUIRED.get(name, {}))
    if has_knob(name):
        kwargs[cls.size_field] = 1  # a placeholder: the solver replaces it
    return cls(**kwargs)


def has_knob(name: str) -> bool:
    return issubclass(METHODS[name], SizedSpec)


def fused_bytes(spec: embtab.EmbeddingSpec, optimizer: embtab.SparseOptimizer) -> tuple[int, object]:
    """Bytes really allocated: fused weights + fused optimizer state + the methods' own tensors."""
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(spec)
    dmp = embtab.fuse(tables, optimizer)
    measured = allocated_bytes(dmp)
    own = sum(m.extra_bytes() for m in tables.methods.values())
    return measured["parameter_bytes"] + measured["optimizer_bytes"] + own, dmp


def test_full_table_bytes_are_the_plain_count():
    assert full_table_bytes(SPEC, OPTIMIZER) == (20_000 + 8_000 + 3_000) * (8 * 4 + 4)
    assert full_table_bytes(SPEC, OPTIMIZER, include_optimizer=False) == 31_000 * 8 * 4


@pytest.mark.parametrize("name", sorted(METHODS))
def test_budget_lands_within_90_to_100_percent_as_counted_and_as_allocated(name):
    full = full_table_bytes(SPEC, OPTIMIZER)
    budget = full // 25 if has_knob(name) else full + 1000
    fit = solve_budget(SPEC, budget, OPTIMIZER, method=method_spec(name))
    assert type(fit.method) is METHODS[name] and fit.spec.method == fit.method
    assert fit.full_bytes == full
    if has_knob(name):
        assert 0.9 * budget <= fit.bytes <= budget
        assert fit.compression_ratio == pytest.approx(full / fit.bytes) and 25 <= fit.compression_ratio <= 25 / 0.9
    else:
        assert fit.bytes == full  # fixed bytes, reported as they are
    assert compression_ratio(fit.spec, OPTIMIZER) == pytest.approx(fit.compression_ratio)
    real, _ = fused_bytes(fit.spec, OPTIMIZER)
    assert real == fit.bytes


@pytest.mark.parametrize("name", sorted(METHODS))
def test_budget_below_the_minimum_is_an_error_giving_the_minimum(name):
    minimum, _ = budget_range(SPEC, OPTIMIZER, method_spec(name))
    # the minimum is reachable, one byte less is not
    assert solve_budget(SPEC, minimum, OPTIMIZER, method=method_spec(name), min_fill=0).bytes == minimum
    with pytest.raises(BelowMinimum) as error:
        solve_budget(SPEC, minimum - 1, OPTIMIZER, method=method_spec(name))
    assert (error.value.budget, error.value.nearest) == (minimum - 1, minimum)
    assert isinstance(error.value, ValueError) and f"{minimum} bytes" in str(error.value)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_budget_above_the_maximum(name):
    minimum, maximum = budget_range(SPEC, OPTIMIZER, method_spec(name))
    full = full_table_bytes(SPEC, OPTIMIZER)
    if not has_knob(name):  # fixed bytes: the configuration itself, with its bytes
        assert minimum == maximum
        fit = solve_budget(SPEC, 3 * maximum, OPTIMIZER, method=method_spec(name))
        assert fit.bytes == maximum and fit.fill == pytest.approx(1 / 3, rel=1e-6)
    elif maximum is not None:
        with pytest.raises(AboveMaximum) as error:
            solve_budget(SPEC, 3 * maximum, OPTIMIZER, method=method_spec(name))
        assert error.value.nearest == maximum
    else:  # unbounded: even three full tables' worth is filled
        fit = solve_budget(SPEC, 3 * full, OPTIMIZER, method=method_spec(name))
        assert 0.9 * 3 * full <= fit.bytes <= 3 * full


def test_multiplexed_budget_is_one_shared_table_and_the_optimizer_switch_counts():
    method = Multiplexed(rows=1, chunk_dim=4)
    fit = solve_budget(SPEC, 50_000, OPTIMIZER, method=method)
    assert list(fit.report.tables) == ["unified"]
    rows = fit.method.rows
    assert fit.bytes == rows * (4 * 4 + 4) and rows == 50_000 // 20  # rows x (4 floats + momentum)
    adagrad = embtab.SparseOptimizer("adagrad", lr=0.1)
    with_state = solve_budget(SPEC, 50_000, adagrad, method=method)
    without = solve_budget(SPEC, 50_000, adagrad, method=method, include_optimizer=False)
    assert with_state.method.rows == 50_000 // 32 and without.method.rows == 50_000 // 16
    assert without.bytes == spec_bytes(without.spec, adagrad, include_optimizer=False) == 50_000
    assert without.report.total == 2 * without.bytes  # Adagrad: one state float per weight
    # per-table chunk counts keep sharing the table the solver sizes
    spec = embtab.EmbeddingSpec(
        features=FEATURES, dim=8, method=method, table_methods=(("user", Multiplexed(1, 4, chunks=3)),)
    )
    fit = solve_budget(spec, 50_000, OPTIMIZER)
    assert dict(fit.spec.table_methods)["user"] == Multiplexed(fit.method.rows, 4, chunks=3)
    assert fit.bytes == 50_000


def _peak_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident set size (VmHWM)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("name", sorted(METHODS))
def test_huge_cardinality_in_one_mib_builds_and_trains_in_small_memory(name):
    budget = 2**20
    features = (
        embtab.FeatureSpec("id", 10**10),
        embtab.FeatureSpec("id_history", 10**10, pooling="none", table="id"),
    )
    spec = embtab.EmbeddingSpec(features=features, dim=16)
    assert full_table_bytes(spec, OPTIMIZER) == 10**10 * (16 * 4 + 4)  # counted, never allocated
    minimum, _ = budget_range(spec, OPTIMIZER, method_spec(name))
    if minimum > budget:  # e.g. the full table, QR (~2 sqrt(n) rows)
        with pytest.raises(BudgetError) as error:
            solve_budget(spec, budget, OPTIMIZER, method=method_spec(name))
        assert error.value.nearest == minimum
        return
    exact = _reset_peak()
    before = _peak_kib() if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fit = solve_budget(spec, budget, OPTIMIZER, method=method_spec(name))
    real, dmp = fused_bytes(fit.spec, OPTIMIZER)
    assert 0.9 * budget <= real == fit.bytes <= budget
    g = torch.Generator().manual_seed(0)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["id", "id_history"],
        values=torch.randint(0, 10**10, (64 + 256,), generator=g),
        lengths=torch.cat([torch.ones(64, dtype=torch.int64), torch.full((64,), 4)]),
    )
    dmp.train()
    weights = {k: v.local_shards()[0].tensor.clone() for k, v in dmp.state_dict().items() if hasattr(v, "local_shards")}
    out = dmp(kjt)
    (out.pooled.values().square().sum() + out.sequence["id_history"].values().square().sum()).backward()
    after = {k: v.local_shards()[0].tensor for k, v in dmp.state_dict().items() if hasattr(v, "local_shards")}
    if weights:
        assert any(not torch.equal(weights[k], after[k]) for k in weights)  # one step trained
    else:  # no table (DHE): the step reached the method's own parameters
        assert any(p.grad is not None and bool(p.grad.any()) for p in dmp.parameters())
    peak = _peak_kib() if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert (peak - before) * 1024 < 64 * 2**20  # a 10**10-row table would be 640 GB


PER_TABLE = sorted(n for n in METHODS if has_knob(n) and getattr(METHODS[n], "size_scope", "table") == "table")
UNEQUAL = embtab.EmbeddingSpec(
    features=(
        embtab.FeatureSpec("huge", 1_000_000),
        embtab.FeatureSpec("mid", 20_000),
        embtab.FeatureSpec("mid_seq", 20_000, pooling="none", table="mid"),
        embtab.FeatureSpec("small", 700),
        embtab.FeatureSpec("tiny", 3),
    ),
    dim=8,
)


@pytest.mark.parametrize("name", PER_TABLE)
@pytest.mark.parametrize("budget", ["1", "1/2", "1/4", "1/16", "1/64", "1/1000"])
def test_no_table_gets_more_rows_than_ids(name, budget):
    from fractions import Fraction

    full = full_table_bytes(UNEQUAL, OPTIMIZER)
    try:
        fit = solve_budget(UNEQUAL, int(full * Fraction(budget)), OPTIMIZER, method=method_spec(name), min_fill=0)
    except BelowMinimum as error:  # QR cannot go below ~2 sqrt(n) rows per table
        assert error.nearest > int(full * Fraction(budget))
        return
    with torch.device("meta"):
        built = embtab.EmbeddingTables(fit.spec, device=torch.device("meta"))
    for table in UNEQUAL.tables():
        method = built.methods[table.name]
        rows = sum(p.rows for p in {p.name: p for p in method.physical_tables}.values() if p.dim == 8 or name == "qr")
        parameters = sum(p.rows * p.dim for p in {p.name: p for p in method.physical_tables}.values())
        assert rows <= table.cardinality and parameters <= table.cardinality * 8, (table.name, rows)
    assert dict(fit.spec.table_methods)["tiny"] == embtab.FullTable()  # too small to gain
    assert fit.bytes <= fit.budget_bytes


def test_rows_are_proportional_to_cardinality_on_unequal_tables():
    from embtab.methods.hashing_trick import HashingTrick

    full = full_table_bytes(UNEQUAL, OPTIMIZER)
    fit = solve_budget(UNEQUAL, full // 16, OPTIMIZER, method=HashingTrick(rows=1))
    methods = dict(fit.spec.table_methods)
    for table in ("huge", "mid", "small"):
        n = UNEQUAL.feature(table).cardinality
        assert methods[table].rows == math.ceil(fit.ratio * n)  # ceil(r * n) rows each
    assert methods["huge"].rows / methods["small"].rows == pytest.approx(1_000_000 / 700, rel=1e-2)
    # the tiny table stays full and is counted: 3 rows, not ceil(r * 3)
    assert fit.full_tables == ("tiny",) and 0.99 / 16 < fit.ratio < 1 / 16


def test_qr_gets_its_own_collisions_per_table_and_1x_is_the_full_table():
    from embtab.methods.qr import QREmbedding

    full = full_table_bytes(UNEQUAL, OPTIMIZER)
    fit = solve_budget(UNEQUAL, full // 64, OPTIMIZER, method=QREmbedding(collisions=1))
    methods = dict(fit.spec.table_methods)
    for table in ("huge", "mid"):  # the fewest collisions within ceil(r * n) rows
        n, c = UNEQUAL.feature(table).cardinality, methods[table].collisions
        assert -(-n // c) + c <= math.ceil(fit.ratio * n) < -(-n // (c - 1)) + c - 1
    assert methods["huge"].collisions != methods["mid"].collisions
    whole = solve_budget(UNEQUAL, full, OPTIMIZER, method=QREmbedding(collisions=1))
    assert whole.bytes == full and set(whole.full_tables) == {"huge", "mid", "small", "tiny"}


def test_parameter_ratio_budget_counts_parameters_without_optimizer_state():
    from embtab.budget import solve_parameter_ratio
    from embtab.methods.hashing_trick import HashingTrick

    adagrad = embtab.SparseOptimizer("adagrad", lr=0.1)  # state as large as the weights: must not count
    fit = solve_parameter_ratio(UNEQUAL, 1 / 10, adagrad, method=HashingTrick(rows=1))
    full_parameters = (1_000_000 + 20_000 + 700 + 3) * 8
    assert fit.full_bytes == full_parameters and fit.bytes == fit.cost.parameters
    assert 0.9 / 10 <= fit.parameter_ratio <= 1 / 10
    assert fit.cost.bytes == fit.report.total > 2 * fit.cost.parameters * 4 * 0.99
