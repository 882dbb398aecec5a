"""Sizing a method to an amount: its knob, searched monotonically, per table or for the whole spec.

A method whose knob sizes each table on its own (hashed rows, QR's collisions, managed
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
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch

from embtab.config import EmbeddingSpec, LogicalTable, MethodSpec, SparseOptimizer
from embtab.costs import Cost, Measure, served_bytes, spec_cost
from embtab.methods.base import SizedSpec
from embtab.methods.full import FullTable
from embtab.quant.precision import element_bytes

_MAX_KNOB = 2**62
UNBOUNDED_BYTES = 2**50  # an increasing knob whose bytes pass 1 PiB counts as unbounded
_RATIO_STEPS = 60  # bisection steps on r: below float resolution of any table's ceil(r * n)
MIN_ROWS_TO_COMPRESS = 200  # DLRM's qr_threshold; the VLDB code's --threshold plays this role

def _size_field(method: MethodSpec) -> str:
    if not isinstance(method, SizedSpec):
        raise ValueError(f"method {method.name!r} has no size knob (size_field); its bytes are fixed")
    return type(method).size_field


def _knob_increasing(method: SizedSpec) -> bool:
    return type(method).size_increasing


def sizes_each_table(method: SizedSpec) -> bool:
    """Whether the knob sizes each table on its own (`SizedSpec.size_scope`)."""
    return type(method).size_scope == "table"


def with_size(spec: EmbeddingSpec, method: MethodSpec, value: int) -> EmbeddingSpec:
    """`spec` with `method` (its knob set to `value`) for every table.

    Per-table overrides of the same method class get the same knob value (so, e.g., multiplexed
    tables with their own chunk counts keep sharing one table); other overrides are kept as they are.
    """
    _size_field(method)  # a clear error for a method without a knob
    assert isinstance(method, SizedSpec)
    return _with_sized(spec, method.with_size(value))


def _with_sized(spec: EmbeddingSpec, sized: MethodSpec) -> EmbeddingSpec:
    """`spec` with the sized method for every table; overrides of its class take its knob value."""
    field = _size_field(sized)
    value = getattr(sized, field)
    overrides = tuple(
        (name, replace(m, **{field: value}) if type(m) is type(sized) else m)
        for name, m in spec.table_methods
    )
    return replace(spec, method=sized, table_methods=overrides)


def spec_knob(spec: EmbeddingSpec, method: MethodSpec, optimizer: SparseOptimizer, measure: Measure) -> "_Knob":
    """The knob of a method sized as a whole (one shared table, one base width) on `spec`."""
    return _Knob(method, lambda m: spec_cost(_with_sized(spec, m), optimizer).measured(measure))


def with_method(spec: EmbeddingSpec, method: MethodSpec) -> EmbeddingSpec:
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

    def amount(self, value: int) -> int:
        """The amount at a value known to be valid (the search only asks at such values)."""
        result = self(value)
        if result is None:
            raise ValueError(f"method {self.method.name!r}: {self.field}={value} rejected: {self.errors[value]}")
        return result

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
            return low, self.amount(low)
        value, best = low, self.amount(low)
        while value * 2 <= _MAX_KNOB and (b := self(value * 2)) is not None and b < best:
            value, best = value * 2, b
        left, right = max(low, value // 2), value * 2
        if self(right) is None:
            right = _bisect(lambda v: self(v) is not None, value, right)[0]
        # the minimum is in [left, right]: bisect on the sign of the slope (evaluations are cached)
        _bisect(self._falling, left, right)
        # amounts need not be exactly unimodal (ceil makes a noisy floor): the smallest seen
        knob = min((v for v, b in self.cache.items() if b is not None), key=lambda v: (self.cache[v], v))
        return knob, self.amount(knob)

    def _falling(self, value: int) -> bool:
        after = self(value + 1)
        return after is not None and after < self.amount(value)

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
            if self.amount(low) <= budget:
                return low
            good, bad = knob, low  # decreasing side: amounts fall from `low` to `knob`
        return _bisect(lambda v: (amount := self(v)) is not None and amount <= budget, good, bad)[0]

    def _above(self, low: int, budget: int) -> int:
        """An increasing knob's value over `budget`, by extrapolating along the last secant
        (amounts are near affine in rows, so a few builds reach the budget's neighbourhood)."""
        v0, b0, v1 = low, self.amount(low), 2 * low
        while True:
            b1 = self(v1)
            if b1 is None or b1 > budget:
                return v1
            slope = (b1 - b0) / (v1 - v0)
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
        served = served_bytes([(p.rows, p.dim) for p in physical], own)
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
        if self.knob.amount(value) >= self.full_parameters:
            return FullTable()
        return self.knob.at(value)


def per_table_spec(
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


def table_sizes(
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
    return per_table_spec(spec, table_sizes(spec, method, optimizer, min_rows_to_compress), method, ratio)[0]


def solve_ratio(
    spec: EmbeddingSpec, method: MethodSpec, optimizer: SparseOptimizer, measure: Measure, budget: int, min_rows: int
) -> tuple[float, EmbeddingSpec, Cost] | tuple[None, EmbeddingSpec, Cost]:
    """The largest ratio r whose per-table configuration fits `budget` (None: not even r = 0)."""
    sizes = table_sizes(spec, method, optimizer, min_rows)
    at = lambda r: per_table_spec(spec, sizes, method, r)  # noqa: E731
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


