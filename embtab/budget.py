"""Budgets: count a configuration's bytes and parameters, and size a method to a budget.

Three accountings (`embtab.costs`): bytes allocated (weights + fused optimizer state), the VLDB
benchmark's parameters, and served bytes at an export precision. Sizing (`embtab.sizing`): one
compression ratio for methods that size each table, one knob for those that size the whole spec,
the budget as the export target for learned sizes.

A budget a method cannot meet raises a `BudgetError` (`BelowMinimum`, `AboveMaximum`,
`Unfillable`), a ValueError whose attributes give the numbers.

Example::

    fit = solve_budget(spec, budget_bytes=2**20, method=HashingTrick(rows=1),
                       optimizer=SparseOptimizer("rowwise_adagrad"))
    tables = EmbeddingTables(fit.spec)   # fit.bytes <= 2**20; fit.ratio is r
    fit = solve_parameter_ratio(spec, 1 / 16, optimizer, method=QREmbedding(collisions=1))
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from embtab.collection import MemoryReport
from embtab.config import EmbeddingSpec, MethodSpec, SparseOptimizer
from embtab.costs import (
    Cost,
    Measure,
    compression_ratio,
    cost_of,
    full_table_bytes,
    full_table_parameters,
    full_table_spec,
    measure_of,
    memory_report,
    meta_tables,
    parameter_ratio,
    spec_bytes,
    spec_cost,
    unit_of,
)
from embtab.methods.base import LearnedSizeSpec, SizedSpec
from embtab.methods.full import FullTable
from embtab.sizing import (
    MIN_ROWS_TO_COMPRESS,
    UNBOUNDED_BYTES,
    per_table_spec,
    sized_per_table,
    sizes_each_table,
    solve_ratio,
    spec_knob,
    table_sizes,
    with_method,
    with_size,
)

__all__ = [
    "AboveMaximum", "BelowMinimum", "BudgetError", "BudgetFit", "Cost", "MIN_ROWS_TO_COMPRESS", "Measure",
    "Unfillable", "budget_range", "compression_ratio", "full_table_bytes", "full_table_parameters",
    "full_table_spec", "memory_report", "parameter_ratio", "sized_per_table", "solve_budget",
    "solve_parameter_ratio", "spec_bytes", "spec_cost", "with_size",
]


class BudgetError(ValueError):
    """A budget the method cannot meet for these features.

    Attributes:
        method: the method's registry name.
        budget: the budget asked for (in `unit`).
        nearest: the reachable amount nearest to it (the minimum, the maximum, or the largest
            configuration within the budget).
        unit: what the numbers count (e.g. "bytes under the rowwise_adagrad optimizer").
    """

    def __init__(self, message: str, method: str, budget: int, nearest: int, unit: str) -> None:
        super().__init__(message)
        self.method, self.budget, self.nearest, self.unit = method, budget, nearest, unit


class BelowMinimum(BudgetError):
    """The budget is below the method's smallest configuration (`nearest` is that minimum)."""


class AboveMaximum(BudgetError):
    """The method's largest configuration fills less than the required share of the budget."""


class Unfillable(BudgetError):
    """No configuration lands within ``[min_fill, 1] x budget`` (its knob moves in coarse steps)."""


@dataclass(frozen=True)
class BudgetFit:
    """A configuration solved for a budget, with its costs and the full table's for comparison.

    Attributes:
        spec: the configuration to build (`EmbeddingTables(fit.spec)`).
        method: the solved method spec (for per-table sizing: the largest table's).
        bytes: the configuration's bytes as the budget counts them (`measure`).
        budget_bytes: the budget asked for (in the same unit as `bytes`).
        full_bytes: the full table's amount, counted the same way.
        report: the configuration's `MemoryReport` (under the optimizer).
        cost: the configuration's bytes and parameters; `full_cost` the full table's.
        ratio: the per-table compression ratio r that was solved for (None for other methods).
        full_tables: tables left full (too small to gain, or compression would add rows).
    """

    spec: EmbeddingSpec
    method: MethodSpec
    bytes: int
    budget_bytes: int
    full_bytes: int
    report: MemoryReport
    cost: Cost | None = None
    full_cost: Cost | None = None
    ratio: float | None = None
    full_tables: tuple[str, ...] = ()

    @property
    def fill(self) -> float:
        """Fraction of the budget used."""
        return self.bytes / self.budget_bytes

    @property
    def compression_ratio(self) -> float:
        """Full-table amount / this configuration's (in the budget's unit)."""
        return self.full_bytes / self.bytes

    @property
    def parameter_ratio(self) -> float:
        """Parameters kept / the full tables' parameters (the VLDB benchmark's compress rate)."""
        assert self.cost is not None and self.full_cost is not None
        return self.cost.parameters / self.full_cost.parameters


# -------------------------------------------------------------------------------------- solving
def budget_range(
    spec: EmbeddingSpec,
    optimizer: SparseOptimizer,
    method: MethodSpec | None = None,
    include_optimizer: bool = True,
    min_rows_to_compress: int = MIN_ROWS_TO_COMPRESS,
    served_precision: str | None = None,
) -> tuple[int, int | None]:
    """(minimum, maximum or None for unbounded) bytes `method` can take for `spec`'s features
    (served bytes at `served_precision` if given)."""
    method = method or spec.method
    measure = measure_of(include_optimizer, served_precision)
    if not isinstance(method, SizedSpec):
        fixed = spec_cost(with_method(spec, method), optimizer).measured(measure)
        return fixed, fixed
    if sizes_each_table(method):
        sizes = table_sizes(spec, method, optimizer, min_rows_to_compress)
        low, high = (per_table_spec(spec, sizes, method, r)[1].measured(measure) for r in (0.0, 1.0))
        return low, high
    knob = spec_knob(spec, method, optimizer, measure)
    low = knob.smallest_valid()
    return knob.least(low)[1], knob.most(low, UNBOUNDED_BYTES)[1]


def solve_budget(
    spec: EmbeddingSpec,
    budget_bytes: int,
    optimizer: SparseOptimizer,
    method: MethodSpec | None = None,
    include_optimizer: bool = True,
    min_fill: float = 0.9,
    min_rows_to_compress: int = MIN_ROWS_TO_COMPRESS,
    served_precision: str | None = None,
) -> BudgetFit:
    """The configuration of `method` (default ``spec.method``) with the most bytes within the budget.

    Args:
        spec: the features and width (its method is replaced by `method` if given).
        budget_bytes: the budget, counted as `MemoryReport.total` under `optimizer`
            (weights + fused optimizer state + methods' own tensors), or as
            `MemoryReport.parameter_bytes` when ``include_optimizer=False``.
        optimizer: the sparse optimizer the tables will be fused with (its state is counted).
        method: a spec of the method to size; the value of its knob (``size_field``) is ignored.
        min_fill: the result must use at least this fraction of the budget.
        min_rows_to_compress: per-table sizing leaves tables with fewer ids full.
        served_precision: count the budget in served bytes of the tables exported at this
            precision (fp32, fp16, int8, int4, int2; see the module docstring) instead.

    Raises:
        BudgetError: `BelowMinimum`, `AboveMaximum` or `Unfillable` (with the nearest amounts).
    """
    measure = measure_of(include_optimizer, served_precision)
    return _solve(spec, budget_bytes, optimizer, method, measure, min_fill, min_rows_to_compress)


def solve_parameter_ratio(
    spec: EmbeddingSpec,
    ratio: float,
    optimizer: SparseOptimizer,
    method: MethodSpec | None = None,
    min_fill: float = 0.9,
    min_rows_to_compress: int = MIN_ROWS_TO_COMPRESS,
) -> BudgetFit:
    """As `solve_budget`, for a budget given as the VLDB benchmark's parameter ratio (parameters
    kept / the full tables' parameters; optimizer state not counted). ``fit.bytes`` and
    ``fit.budget_bytes`` are then parameter counts."""
    if not 0 < ratio:
        raise ValueError(f"parameter ratio must be > 0, got {ratio}")
    budget = int(ratio * full_table_parameters(spec))
    return _solve(spec, budget, optimizer, method, "parameters", min_fill, min_rows_to_compress)


def _solve(
    spec: EmbeddingSpec,
    budget: int,
    optimizer: SparseOptimizer,
    method: MethodSpec | None,
    measure: Measure,
    min_fill: float,
    min_rows: int,
) -> BudgetFit:
    method = method or spec.method
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    unit = unit_of(measure, optimizer)
    full_cost = spec_cost(full_table_spec(spec), optimizer)

    def fit(solved: EmbeddingSpec, ratio: float | None = None) -> BudgetFit:
        tables = meta_tables(solved)
        report = tables.memory_bytes(optimizer)
        cost = cost_of(report, list(tables.methods.values()))
        full = tuple(n for n, m in tables.methods.items() if isinstance(m.table.method, FullTable))
        used, full_amount = cost.measured(measure), full_cost.measured(measure)
        return BudgetFit(solved, solved.method, used, budget, full_amount, report, cost, full_cost, ratio, full)

    if isinstance(method, LearnedSizeSpec):
        return _learned(spec, budget, optimizer, method, measure, unit, fit)
    if not isinstance(method, SizedSpec):
        result = fit(with_method(spec, method))
        if result.bytes > budget:
            raise BelowMinimum(
                f"budget {budget} {unit} is below the {method.name!r} configuration's fixed "
                f"{result.bytes} {unit}; expected a budget >= {result.bytes}",
                method.name, budget, result.bytes, unit,
            )
        return result
    if sizes_each_table(method):
        ratio, solved, cost = solve_ratio(spec, method, optimizer, measure, budget, min_rows)
        if ratio is None:
            raise _below_minimum(method, budget, cost.measured(measure), "every table at its smallest", unit)
        return _checked(fit(solved, ratio), min_fill, method, unit, f"per-table ratio r={ratio:.6g}", ratio == 1.0)
    knob = spec_knob(spec, method, optimizer, measure)
    low = knob.smallest_valid()
    least_value, least = knob.least(low)
    if least > budget:
        raise _below_minimum(method, budget, least, f"{knob.field}={least_value}", unit)
    value = knob.fitting(budget)
    assert value is not None
    most = knob.most(low, budget)[1]
    maximal = most is not None and most <= budget
    return _checked(fit(with_size(spec, method, value)), min_fill, method, unit, f"{knob.field}={value}", maximal)


def _learned(
    spec: EmbeddingSpec,
    budget: int,
    optimizer: SparseOptimizer,
    method: LearnedSizeSpec,
    measure: Measure,
    unit: str,
    fit: Callable[[EmbeddingSpec], BudgetFit],
) -> BudgetFit:
    """Methods whose exported size is learned (OptEmbed, PEP, DNIS; ``budget_field``) take the
    budget as their export target: `embtab.search` prunes to it after training. `bytes` is that
    target; `report` and `cost` are the training allocation. The budget must cover the smallest
    export (``method.floor_method()``: no row kept, the narrowest width)."""
    if measure == "parameters" or measure.startswith("served_"):
        raise ValueError(
            f"method {method.name!r}: a learned size takes a budget in training bytes, not a "
            f"{'parameter ratio' if measure == 'parameters' else 'served-bytes budget'}"
        )
    smallest = with_method(spec, method.floor_method())
    floor = spec_cost(smallest, optimizer).measured(measure)
    if budget < floor:
        raise _below_minimum(method, budget, floor, type(method).floor_description, unit)
    counted = optimizer.kind if measure == "bytes" else ""
    training = fit(with_method(spec, method.with_budget(budget, counted)))
    return replace(training, bytes=budget)


def _below_minimum(method: MethodSpec, budget: int, minimum: int, at: str, unit: str) -> BelowMinimum:
    return BelowMinimum(
        f"budget {budget} {unit.split(' ')[0]} is below the minimum of method {method.name!r} for these "
        f"features: {minimum} {unit} (at {at}); expected a budget >= {minimum}",
        method.name, budget, minimum, unit,
    )


def _checked(result: BudgetFit, min_fill: float, method: MethodSpec, unit: str, at: str, maximal: bool) -> BudgetFit:
    """`result`, or an `AboveMaximum` (the method at its largest) / `Unfillable` error when it
    uses less than `min_fill` of the budget."""
    if result.bytes > result.budget_bytes:
        raise AssertionError(f"solved configuration uses {result.bytes} > budget {result.budget_bytes}")
    if result.bytes < min_fill * result.budget_bytes:
        kind = AboveMaximum if maximal else Unfillable
        what = "is above the maximum of" if maximal else f"cannot be filled to {min_fill:.0%} by"
        raise kind(
            f"budget {result.budget_bytes} {unit.split(' ')[0]} {what} method {method.name!r} for these "
            f"features: {result.bytes} {unit} at {at}; expected a budget <= {int(result.bytes / min_fill)}",
            method.name, result.budget_bytes, result.bytes, unit,
        )
    return result
