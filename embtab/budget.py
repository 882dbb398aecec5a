"""Budgets: count a configuration's bytes and parameters, and size a method to a budget.

Two accountings, both reported for every configuration:

- **bytes** (`MemoryReport.total`): float32 weights of every physical table (a table shared by
  several features, as with feature multiplexing, counted once), the fused optimizer's state
  (``include_optimizer=True``) and the methods' own parameters and buffers (remaps, id maps);
- **parameters** (the VLDB 2024 benchmark's ``compress_rate``): float elements of the physical
  tables plus the methods' own learnable parameters (projections, importance weights), without
  optimizer state or integer remap buffers. The *parameter ratio* is parameters / the full
  tables' parameters;
- **served bytes** at an export precision (``served_precision="int4"``; fp32, fp16, int8, int4,
  int2): what fbgemm's inference kernels hold once the tables are exported
  (`embtab.quant.export`): rows at `served_row_bytes` (width 16: 64 / 32 / 20 / 12 / 8 B, an IntN
  row's fp16 scale and bias included, aligned to 4 B), each table padded to 128 B, plus the
  methods' own tensors; no optimizer or QAT state (neither is served).

Both are computed from tables built on the meta device, so nothing table-sized is allocated.

Sizing. A method whose knob sizes each table on its own (hashed rows, QR's collisions, managed
collisions' rows, multi-hash rows; ``size_scope = "table"``, the default) is sized *per table*, as
the VLDB benchmark's code does: one compression ratio ``r`` is solved for, and each table of ``n``
ids gets the knob value whose parameters are the most within ``ceil(r * n)`` rows' worth
(``ceil(r * n) * dim`` parameters; QR: the fewest collisions that fit). A table stays full when it
has fewer than ``min_rows_to_compress`` ids, or when its method at that size would hold as many
parameters as the full table (compression would add rows): no table ever gets more rows than it
has ids. The result is a spec with one override per table (`EmbeddingSpec.table_methods`).
Methods whose knob sizes everything at once (feature multiplexing's one shared table, MDE's base
width; ``size_scope = "spec"``) are sized by that one knob. Methods without a knob (the full table)
have fixed bytes; methods whose exported size is learned (OptEmbed, PEP, DNIS: ``budget_field``)
get the budget as their export target (`embtab.search` prunes to it after training).

A budget a method cannot meet raises a `BudgetError` (`BelowMinimum`, `AboveMaximum`,
`Unfillable`), a ValueError whose attributes give the numbers.

Example::

    fit = solve_budget(spec, budget_bytes=2**20, method=HashingTrick(rows=1),
                       optimizer=SparseOptimizer("rowwise_adagrad"))
    tables = EmbeddingTables(fit.spec)   # fit.bytes <= 2**20; fit.ratio is r
    fit = solve_parameter_ratio(spec, 1 / 16, optimizer, method=QREmbedding(collisions=1))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch

from embtab.collection import EmbeddingTables, MemoryReport
from embtab.config import EmbeddingSpec, LogicalTable, MethodSpec, SparseOptimizer
from embtab.methods.base import LearnedSizeSpec, SizedSpec
from embtab.methods.full import FullTable
from embtab.quant.precision import SERVED_PRECISIONS, check_served_precision, element_bytes, served_table_bytes

_MAX_KNOB = 2**62
_UNBOUNDED_BYTES = 2**50  # an increasing knob whose bytes pass 1 PiB counts as unbounded
_RATIO_STEPS = 60  # bisection steps on r: below float resolution of any table's ceil(r * n)
MIN_ROWS_TO_COMPRESS = 200  # DLRM's qr_threshold; the VLDB code's --threshold plays this role

Measure = Literal[
    "bytes", "parameter_bytes", "parameters", "served_fp32", "served_fp16", "served_int8", "served_int4", "served_int2"
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
class Cost:
    """A configuration counted both ways (see the module docstring)."""

    bytes: int
    parameter_bytes: int
    parameters: int
    served: tuple[int, ...] = (0,) * len(SERVED_PRECISIONS)  # served bytes at each of SERVED_PRECISIONS

    def measured(self, measure: Measure) -> int:
        if measure.startswith("served_"):
            return self.served[SERVED_PRECISIONS.index(measure.removeprefix("served_"))]
        return {"bytes": self.bytes, "parameter_bytes": self.parameter_bytes, "parameters": self.parameters}[measure]

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(
            self.bytes + other.bytes, self.parameter_bytes + other.parameter_bytes, self.parameters + other.parameters,
            tuple(a + b for a, b in zip(self.served, other.served)),
        )


def _served(tables: list[tuple[int, int]], own_bytes: int) -> tuple[int, ...]:
    """Served bytes of physical tables ``[(rows, dim), ...]`` at each export precision."""
    return tuple(sum(served_table_bytes(r, d, p) for r, d in tables) + own_bytes for p in SERVED_PRECISIONS)


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


# ------------------------------------------------------------------------------------ counting
def _meta_tables(spec: EmbeddingSpec) -> EmbeddingTables:
    meta = torch.device("meta")
    try:
        with meta:  # methods' own buffers (e.g. managed collisions' id map) land on meta too
            return EmbeddingTables(spec, device=meta)
    except (RuntimeError, NotImplementedError):  # a method that needs real tensors to build
        return EmbeddingTables(spec, device=meta)


def _cost_of(report: MemoryReport, methods: list[torch.nn.Module]) -> Cost:
    parameters = sum(t.rows * t.dim for t in report.tables.values())
    parameters += sum(p.numel() for m in methods for p in m.parameters())
    served = _served([(t.rows, t.dim) for t in report.tables.values()], sum(m.extra_bytes() for m in methods))
    return Cost(report.total, report.parameter_bytes, parameters, served)


def memory_report(spec: EmbeddingSpec, optimizer: SparseOptimizer | None) -> MemoryReport:
    """`spec`'s `MemoryReport`, from tables built on the meta device (nothing table-sized allocated)."""
    return _meta_tables(spec).memory_bytes(optimizer)


def spec_cost(spec: EmbeddingSpec, optimizer: SparseOptimizer) -> Cost:
    """`spec`'s bytes (with and without optimizer state) and parameters."""
    tables = _meta_tables(spec)
    return _cost_of(tables.memory_bytes(optimizer), list(tables.methods.values()))


def spec_bytes(spec: EmbeddingSpec, optimizer: SparseOptimizer, include_optimizer: bool = True) -> int:
    """Bytes of `spec`: `MemoryReport.total` (or `.parameter_bytes` without the optimizer state)."""
    report = memory_report(spec, optimizer)
    return report.total if include_optimizer else report.parameter_bytes


def full_table_spec(spec: EmbeddingSpec) -> EmbeddingSpec:
    """`spec` with every table full (the reference compression is measured against)."""
    return EmbeddingSpec(features=spec.features, dim=spec.dim, method=FullTable())


def full_table_bytes(spec: EmbeddingSpec, optimizer: SparseOptimizer, include_optimizer: bool = True) -> int:
    return spec_bytes(full_table_spec(spec), optimizer, include_optimizer)


def full_table_parameters(spec: EmbeddingSpec) -> int:
    """Parameters of the full tables: the sum of cardinality x width."""
    return sum(t.cardinality * spec.dim for t in spec.tables())


def compression_ratio(spec: EmbeddingSpec, optimizer: SparseOptimizer, include_optimizer: bool = True) -> float:
    """Full-table bytes / `spec`'s bytes, both counted under `optimizer`."""
    return full_table_bytes(spec, optimizer, include_optimizer) / spec_bytes(spec, optimizer, include_optimizer)


def parameter_ratio(spec: EmbeddingSpec) -> float:
    """`spec`'s parameters / the full tables' parameters (the VLDB benchmark's compress rate)."""
    return spec_cost(spec, SparseOptimizer("sgd")).parameters / full_table_parameters(spec)


def _measure(include_optimizer: bool, served_precision: str | None = None) -> Measure:
    if served_precision is not None:
        check_served_precision(served_precision, "budget")
        return f"served_{served_precision}"  # type: ignore[return-value]
    return "bytes" if include_optimizer else "parameter_bytes"


def _unit(measure: Measure, optimizer: SparseOptimizer) -> str:
    if measure.startswith("served_"):
        return f"bytes served at {measure.removeprefix('served_')} (fbgemm's inference rows)"
    return {
        "bytes": f"bytes under the {optimizer.kind} optimizer",
        "parameter_bytes": "parameter bytes",
        "parameters": "parameters",
    }[measure]


# ------------------------------------------------------------------------------ method knobs
def _size_field(method: MethodSpec) -> str:
    if not isinstance(method, SizedSpec):
        raise ValueError(f"method {method.name!r} has no size knob (size_field); its bytes are fixed")
    return type(method).size_field


def _knob_increasing(method: SizedSpec) -> bool:
    return type(method).size_increasing


def _sized_per_table(method: SizedSpec) -> bool:
    """Whether the knob sizes each table on its own (`SizedSpec.size_scope`)."""
    return type(method).size_scope == "table"


def with_size(spec: EmbeddingSpec, method: MethodSpec, value: int) -> EmbeddingSpec:
    """`spec` with `method` (its knob set to `value`) for every table.

    Per-table overrides of the same method class get the same knob value (so, e.g., multiplexed
    tables with their own chunk counts keep sharing one table); other overrides are kept as they are.
    """
    _size_field(method)  # a clear error for a method without a knob
    return _with_sized(spec, method.with_size(value))  # type: ignore[attr-defined]


def _with_sized(spec: EmbeddingSpec, sized: MethodSpec) -> EmbeddingSpec:
    """`spec` with the sized method for every table; overrides of its class take its knob value."""
    field = _size_field(sized)
    value = getattr(sized, field)
    overrides = tuple(
        (name, replace(m, **{field: value}) if type(m) is type(sized) else m)
        for name, m in spec.table_methods
    )
    return replace(spec, method=sized, table_methods=overrides)


def _spec_knob(spec: EmbeddingSpec, method: MethodSpec, optimizer: SparseOptimizer, measure: Measure) -> "_Knob":
    """The knob of a method sized as a whole (one shared table, one base width) on `spec`."""
    return _Knob(method, lambda m: spec_cost(_with_sized(spec, m), optimizer).measured(measure))


def _with_method(spec: EmbeddingSpec, method: MethodSpec) -> EmbeddingSpec:
    return replace(spec, method=method)


# ------------------------------------------------------------------ one knob, one monotone search
def _bisect(ok: Callable[[int], bool], good: int, bad: int) -> tuple[int, int]:
    """Adjacent ``(good, bad)`` with ``ok(good)`` and not ``ok(bad)``, given both at the ends
    (either order); ``ok`` must flip once between them."""
    while abs(bad - good) > 1:
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good, bad


class _Knob:
    """A method's knob on one configuration: memoized amounts per value (None: value rejected)."""

    def __init__(self, method: MethodSpec, amount: Callable[[MethodSpec], int]) -> None:
        self.method, self.field = method, _size_field(method)
        self.increasing = _knob_increasing(method)
        self._amount = amount
        self.cache: dict[int, int | None] = {}
        self.errors: dict[int, str] = {}

    def at(self, value: int) -> MethodSpec:
        return replace(self.method, **{self.field: value})

    def __call__(self, value: int) -> int | None:
        if value not in self.cache:
            try:
                self.cache[value] = self._amount(self.at(value))
            except ValueError as error:
                self.cache[value], self.errors[value] = None, str(error)
        return self.cache[value]

    def smallest_valid(self) -> int:
        """The smallest value the method accepts (validity is assumed to hold from it upward)."""
        if self(1) is not None:
            return 1
        high = 2
        while self(high) is None:
            if high >= _MAX_KNOB:
                raise ValueError(
                    f"method {self.method.name!r}: no valid {self.field} found; for {self.field}=1: "
                    f"{self.errors.get(1, '')}"
                )
            high *= 2
        return _bisect(lambda v: self(v) is not None, high, high // 2)[0]

    def least(self, low: int) -> tuple[int, int]:
        """(value, amount) of the smallest amount: `low` for an increasing knob; for a decreasing
        one the bottom of its unimodal curve (QR's ``ceil(n / m) + m`` near ``sqrt(n)``)."""
        if self.increasing:
            return low, self(low)  # type: ignore[return-value]
        value, best = low, self(low)
        while value * 2 <= _MAX_KNOB and (b := self(value * 2)) is not None and b < best:  # type: ignore[operator]
            value, best = value * 2, b
        left, right = max(low, value // 2), value * 2
        if self(right) is None:
            right = _bisect(lambda v: self(v) is not None, value, right)[0]
        # the minimum is in [left, right]: bisect on the sign of the slope (evaluations are cached)
        _bisect(self._falling, left, right)
        # amounts need not be exactly unimodal (ceil makes a noisy floor): the smallest seen
        knob = min((v for v, b in self.cache.items() if b is not None), key=lambda v: (self.cache[v], v))
        return knob, self(knob)  # type: ignore[return-value]

    def _falling(self, value: int) -> bool:
        after = self(value + 1)
        return after is not None and after < self(value)  # type: ignore[operator]

    def most(self, low: int, stop_above: int) -> tuple[int, int | None]:
        """(value, amount) of the largest amount, or amount None when it passes `stop_above`
        (unbounded for the purpose at hand); a decreasing knob's largest is at `low`."""
        if not self.increasing:
            return low, self(low)
        value = low
        while value * 16 <= _MAX_KNOB:
            b = self(value * 16)
            if b is None:
                top = _bisect(lambda v: self(v) is not None, value, value * 16)[0]
                return top, self(top)
            if b > stop_above:
                return value * 16, None
            value *= 16
        return value, None

    def fitting(self, budget: int) -> int | None:
        """The value with the largest amount within `budget` (None if even the least exceeds it)."""
        low = self.smallest_valid()
        knob, least = self.least(low)
        if least > budget:
            return None
        if self.increasing:
            top, most = self.most(low, budget)
            if most is not None and most <= budget:
                return top
            good, bad = low, self._above(low, budget)
        else:
            if self(low) <= budget:  # type: ignore[operator]
                return low
            good, bad = knob, low  # decreasing side: amounts fall from `low` to `knob`
        return _bisect(lambda v: self(v) is not None and self(v) <= budget, good, bad)[0]  # type: ignore[operator]

    def _above(self, low: int, budget: int) -> int:
        """An increasing knob's value over `budget`, by extrapolating along the last secant
        (amounts are near affine in rows, so a few builds reach the budget's neighbourhood)."""
        v0, b0, v1 = low, self(low), 2 * low
        while True:
            b1 = self(v1)
            if b1 is None or b1 > budget:
                return v1
            slope = (b1 - b0) / (v1 - v0)  # type: ignore[operator]
            guess = v1 + math.ceil((budget - b1) / slope * 1.02) + 1 if slope > 0 else 2 * v1
            v0, b0, v1 = v1, b1, min(max(guess, v1 + 1), 1024 * v1, _MAX_KNOB)


# ---------------------------------------------------------------------------- per-table sizing
class _TableSizes:
    """One logical table under a per-table method: its cost at each knob value (memoized, built
    on meta from the method alone) and its override for a ratio r."""

    def __init__(self, table: LogicalTable, method: MethodSpec, optimizer: SparseOptimizer, min_rows: int) -> None:
        self.table, self.optimizer = table, optimizer
        self.full_parameters = table.cardinality * table.dim
        self.stays_full = table.cardinality < min_rows
        self.knob = _Knob(method, lambda m: self.cost(m).parameters)
        self._for_rows: dict[int, MethodSpec] = {}

    def cost(self, method: MethodSpec) -> Cost:
        with torch.device("meta"):
            built = method.build(replace(self.table, method=method))
        physical = {p.name: p for p in built.physical_tables}.values()
        weights = sum(p.rows * p.dim * element_bytes(self.table.precision) for p in physical)
        state = sum(self.optimizer.state_bytes(p.rows, p.dim) for p in physical)
        own = built.extra_bytes()
        parameters = sum(p.rows * p.dim for p in physical) + sum(p.numel() for p in built.parameters())
        served = _served([(p.rows, p.dim) for p in physical], own)
        return Cost(weights + own + state, weights + own, parameters, served)

    def method_for(self, ratio: float) -> MethodSpec:
        """The table's method at ratio r: the knob with the most parameters within ``ceil(r * n)``
        rows' worth (the least it can take when even that is over), or the full table."""
        rows = min(self.table.cardinality, math.ceil(ratio * self.table.cardinality))
        if rows not in self._for_rows:
            self._for_rows[rows] = self._sized(rows * self.table.dim)
        return self._for_rows[rows]

    def _sized(self, target: int) -> MethodSpec:
        if self.stays_full or target >= self.full_parameters:
            return FullTable()
        value = self.knob.fitting(target)
        if value is None:
            value = self.knob.least(self.knob.smallest_valid())[0]
        if self.knob(value) >= self.full_parameters:  # type: ignore[operator]
            return FullTable()
        return self.knob.at(value)


def _per_table_spec(
    spec: EmbeddingSpec, sizes: dict[str, _TableSizes], method: MethodSpec, ratio: float
) -> tuple[EmbeddingSpec, Cost]:
    overrides = tuple((name, s.method_for(ratio)) for name, s in sizes.items())
    cost = sum((s.cost(m) for (_, m), s in zip(overrides, sizes.values())), Cost(0, 0, 0))
    largest = max(sizes.values(), key=lambda s: s.table.cardinality)
    representative = largest.method_for(ratio)
    if isinstance(representative, FullTable):
        representative = method
    solved = replace(spec, method=representative, table_methods=overrides)
    return solved, cost


def _table_sizes(
    spec: EmbeddingSpec, method: MethodSpec, optimizer: SparseOptimizer, min_rows: int
) -> dict[str, _TableSizes]:
    """Each table's sizes; a table's own override of the same method class is the one sized."""
    sizes = {}
    for table in spec.tables():
        own = spec.method_of(table.name)
        base = own if type(own) is type(method) else method
        sizes[table.name] = _TableSizes(table, base, optimizer, min_rows)
    return sizes


def sized_per_table(
    spec: EmbeddingSpec, method: MethodSpec, ratio: float, optimizer: SparseOptimizer,
    min_rows_to_compress: int = MIN_ROWS_TO_COMPRESS,
) -> EmbeddingSpec:
    """`spec` with every table sized for compression ratio `ratio` (see the module docstring)."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return _per_table_spec(spec, _table_sizes(spec, method, optimizer, min_rows_to_compress), method, ratio)[0]


def _solve_ratio(
    spec: EmbeddingSpec, method: MethodSpec, optimizer: SparseOptimizer, measure: Measure, budget: int, min_rows: int
) -> tuple[float, EmbeddingSpec, Cost] | tuple[None, EmbeddingSpec, Cost]:
    """The largest ratio r whose per-table configuration fits `budget` (None: not even r = 0)."""
    sizes = _table_sizes(spec, method, optimizer, min_rows)
    at = lambda r: _per_table_spec(spec, sizes, method, r)  # noqa: E731
    top = at(1.0)
    if top[1].measured(measure) <= budget:
        return 1.0, *top
    low = at(0.0)
    if low[1].measured(measure) > budget:
        return None, *low
    good, bad = 0.0, 1.0
    for _ in range(_RATIO_STEPS):
        mid = (good + bad) / 2
        if at(mid)[1].measured(measure) <= budget:
            good = mid
        else:
            bad = mid
    return good, *at(good)


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
    measure = _measure(include_optimizer, served_precision)
    if not isinstance(method, SizedSpec):
        fixed = spec_cost(_with_method(spec, method), optimizer).measured(measure)
        return fixed, fixed
    if _sized_per_table(method):
        sizes = _table_sizes(spec, method, optimizer, min_rows_to_compress)
        low, high = (_per_table_spec(spec, sizes, method, r)[1].measured(measure) for r in (0.0, 1.0))
        return low, high
    knob = _spec_knob(spec, method, optimizer, measure)
    low = knob.smallest_valid()
    return knob.least(low)[1], knob.most(low, _UNBOUNDED_BYTES)[1]


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
    measure = _measure(include_optimizer, served_precision)
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
    unit = _unit(measure, optimizer)
    full_cost = spec_cost(full_table_spec(spec), optimizer)

    def fit(solved: EmbeddingSpec, ratio: float | None = None) -> BudgetFit:
        tables = _meta_tables(solved)
        report = tables.memory_bytes(optimizer)
        cost = _cost_of(report, list(tables.methods.values()))
        full = tuple(n for n, m in tables.methods.items() if isinstance(m.table.method, FullTable))
        used, full_amount = cost.measured(measure), full_cost.measured(measure)
        return BudgetFit(solved, solved.method, used, budget, full_amount, report, cost, full_cost, ratio, full)

    if isinstance(method, LearnedSizeSpec):
        return _learned(spec, budget, optimizer, method, measure, unit, fit)
    if not isinstance(method, SizedSpec):
        result = fit(_with_method(spec, method))
        if result.bytes > budget:
            raise BelowMinimum(
                f"budget {budget} {unit} is below the {method.name!r} configuration's fixed "
                f"{result.bytes} {unit}; expected a budget >= {result.bytes}",
                method.name, budget, result.bytes, unit,
            )
        return result
    if _sized_per_table(method):
        ratio, solved, cost = _solve_ratio(spec, method, optimizer, measure, budget, min_rows)
        if ratio is None:
            raise _below_minimum(method, budget, cost.measured(measure), "every table at its smallest", unit)
        return _checked(fit(solved, ratio), min_fill, method, unit, f"per-table ratio r={ratio:.6g}", ratio == 1.0)
    knob = _spec_knob(spec, method, optimizer, measure)
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
    smallest = _with_method(spec, method.floor_method())
    floor = spec_cost(smallest, optimizer).measured(measure)
    if budget < floor:
        raise _below_minimum(method, budget, floor, type(method).floor_description, unit)
    counted = optimizer.kind if measure == "bytes" else ""
    training = fit(_with_method(spec, method.with_budget(budget, counted)))
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
