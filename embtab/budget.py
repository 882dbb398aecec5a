"""Byte budgets: count a configuration's bytes, and solve a method's size for a budget.

The bytes of a configuration are `EmbeddingTables.memory_bytes(optimizer).total`: float32 weights
of every physical table (a table shared by several features, as with feature multiplexing, counted
once), the fused optimizer's state (``include_optimizer=True``), and the methods' own parameters and
buffers. They are computed by building the tables on the meta device, so nothing proportional to a
table or to a feature's cardinality is allocated.

`solve_budget` searches the integer knob a method spec names in its ``size_field`` class attribute
(``size_increasing`` says whether bytes grow with it: rows of a hashed table do, QR's collisions
do not) for the configuration with the most bytes within the budget, and checks that it uses at
least `min_fill` (90%) of it. Methods without a knob (the full table) have fixed bytes. Methods whose
exported size is learned (OptEmbed, PEP: a ``budget_field`` class attribute) get the budget as their
export target; `embtab.search` prunes them to it after training.

Example::

    fit = solve_budget(spec, budget_bytes=2**20, method=Multiplexed(rows=1, chunk_dim=8),
                       optimizer=SparseOptimizer("rowwise_adagrad"))
    tables = EmbeddingTables(fit.spec)   # fit.bytes <= 2**20, fit.compression_ratio
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
import torch

from embtab.collection import EmbeddingTables, MemoryReport
from embtab.config import EmbeddingSpec, MethodSpec, SparseOptimizer
from embtab.methods.full import FullTable

_MAX_KNOB = 2**62
_UNBOUNDED_BYTES = 2**50  # an increasing knob whose bytes pass 1 PiB counts as unbounded


@dataclass(frozen=True)
class BudgetFit:
    """A configuration solved for a budget, with its bytes and the full table's for comparison.

    Attributes:
        spec: the configuration to build (`EmbeddingTables(fit.spec)`).
        method: the solved method spec (the knob filled in).
        bytes: the configuration's bytes as the budget counts them.
        budget_bytes: the budget asked for.
        full_bytes: the full table's bytes for the same features, counted the same way.
        report: the configuration's `MemoryReport` (under the optimizer).
    """

    spec: EmbeddingSpec
    method: MethodSpec
    bytes: int
    budget_bytes: int
    full_bytes: int
    report: MemoryReport

    @property
    def fill(self) -> float:
        """Fraction of the budget used."""
        return self.bytes / self.budget_bytes

    @property
    def compression_ratio(self) -> float:
        """Full-table bytes / this configuration's bytes."""
        return self.full_bytes / self.bytes


def memory_report(spec: EmbeddingSpec, optimizer: SparseOptimizer | None) -> MemoryReport:
    """`spec`'s `MemoryReport`, from tables built on the meta device (nothing table-sized allocated)."""
    meta = torch.device("meta")
    try:
        with meta:  # methods' own buffers (e.g. managed collisions' id map) land on meta too
            tables = EmbeddingTables(spec, device=meta)
    except (RuntimeError, NotImplementedError):  # a method that needs real tensors to build
        tables = EmbeddingTables(spec, device=meta)
    return tables.memory_bytes(optimizer)


def spec_bytes(spec: EmbeddingSpec, optimizer: SparseOptimizer, include_optimizer: bool = True) -> int:
    """Bytes of `spec`: `MemoryReport.total` (or `.parameter_bytes` without the optimizer state)."""
    report = memory_report(spec, optimizer)
    return report.total if include_optimizer else report.parameter_bytes


def full_table_spec(spec: EmbeddingSpec) -> EmbeddingSpec:
    """`spec` with every table full (the reference compression is measured against)."""
    return EmbeddingSpec(features=spec.features, dim=spec.dim, method=FullTable())


def full_table_bytes(spec: EmbeddingSpec, optimizer: SparseOptimizer, include_optimizer: bool = True) -> int:
    return spec_bytes(full_table_spec(spec), optimizer, include_optimizer)


def compression_ratio(spec: EmbeddingSpec, optimizer: SparseOptimizer, include_optimizer: bool = True) -> float:
    """Full-table bytes / `spec`'s bytes, both counted under `optimizer`."""
    return full_table_bytes(spec, optimizer, include_optimizer) / spec_bytes(spec, optimizer, include_optimizer)


def with_size(spec: EmbeddingSpec, method: MethodSpec, value: int) -> EmbeddingSpec:
    """`spec` with `method` (its knob set to `value`) for every table.

    Per-table overrides of the same method class get the same knob value (so, e.g., multiplexed
    tables with their own chunk counts keep sharing one table); other overrides are kept as they are.
    """
    field = _size_field(method)
    sized = replace(method, **{field: value})
    overrides = tuple(
        (name, replace(m, **{field: value}) if type(m) is type(method) else m)
        for name, m in spec.table_methods
    )
    return EmbeddingSpec(features=spec.features, dim=spec.dim, method=sized, table_methods=overrides)


def _size_field(method: MethodSpec) -> str:
    field = getattr(type(method), "size_field", None)
    if not field:
        raise ValueError(f"method {method.name!r} has no size knob (size_field); its bytes are fixed")
    return field


class _Bytes:
    """Memoized bytes of `spec` with the knob at a value; ``None`` for a value the method rejects."""

    def __init__(
        self, spec: EmbeddingSpec, method: MethodSpec, optimizer: SparseOptimizer, include_optimizer: bool
    ) -> None:
        self.spec, self.method = spec, method
        self.optimizer, self.include_optimizer = optimizer, include_optimizer
        self.cache: dict[int, int | None] = {}
        self.errors: dict[int, str] = {}

    def __call__(self, value: int) -> int | None:
        if value not in self.cache:
            try:
                self.cache[value] = spec_bytes(
                    with_size(self.spec, self.method, value), self.optimizer, self.include_optimizer
                )
            except ValueError as error:
                self.cache[value], self.errors[value] = None, str(error)
        return self.cache[value]


def _smallest_valid(f: _Bytes, field: str) -> int:
    """The smallest knob value the method accepts (validity is assumed to hold from it upward)."""
    if f(1) is not None:
        return 1
    high = 2
    while f(high) is None:
        if high >= _MAX_KNOB:
            reason = f.errors.get(1, "")
            raise ValueError(f"method {f.method.name!r}: no valid {field} found; for {field}=1: {reason}")
        high *= 2
    low = high // 2  # invalid
    while high - low > 1:
        mid = (low + high) // 2
        if f(mid) is None:
            low = mid
        else:
            high = mid
    return high


def _largest_valid(f: _Bytes, valid: int, invalid: int) -> int:
    while invalid - valid > 1:
        mid = (valid + invalid) // 2
        if f(mid) is None:
            invalid = mid
        else:
            valid = mid
    return valid


def _boundary(f: _Bytes, good: int, bad: int, budget: int) -> tuple[int, int]:
    """Adjacent (good, bad) knob values with f(good) <= budget < f(bad), f monotone between them.

    Interpolation search (bytes are close to affine in a rows knob), falling back to bisection
    whenever interpolation does not halve the bracket.
    """
    bisect_next = False
    while abs(bad - good) > 1:
        fg, fb = f(good), f(bad)
        assert fg is not None and fb is not None
        mid = (good + bad) // 2
        if not bisect_next and fb != fg:
            guess = good + int((bad - good) * (budget - fg) / (fb - fg))
            if min(good, bad) < guess < max(good, bad):
                mid = guess
        value = f(mid)
        if value is None:
            raise ValueError(f"method {f.method.name!r}: knob value {mid} rejected inside the valid range")
        width = abs(bad - good)
        if value <= budget:
            good = mid
        else:
            bad = mid
        bisect_next = abs(bad - good) > width // 2
    return good, bad


def budget_range(
    spec: EmbeddingSpec,
    optimizer: SparseOptimizer,
    method: MethodSpec | None = None,
    include_optimizer: bool = True,
) -> tuple[int, int | None]:
    """(minimum, maximum or None) bytes `method` can take for `spec`'s features.

    For a decreasing knob (QR's collisions) the minimum is where bytes stop decreasing.
    """
    method = method or spec.method
    if not getattr(type(method), "size_field", None):
        fixed = spec_bytes(_with_method(spec, method), optimizer, include_optimizer)
        return fixed, fixed
    f = _Bytes(spec, method, optimizer, include_optimizer)
    low = _smallest_valid(f, _size_field(method))
    if getattr(type(method), "size_increasing", True):
        return f(low), _increasing_max(f, low)  # type: ignore[return-value]
    _, minimum = _decreasing_min(f, low)
    return minimum, f(low)


def _with_method(spec: EmbeddingSpec, method: MethodSpec) -> EmbeddingSpec:
    return EmbeddingSpec(features=spec.features, dim=spec.dim, method=method, table_methods=spec.table_methods)


def _increasing_max(f: _Bytes, low: int, stop_above: int | None = None) -> int | None:
    """Max bytes of an increasing knob (None if unbounded, or once bytes exceed `stop_above`)."""
    stop_above = _UNBOUNDED_BYTES if stop_above is None else stop_above
    value = low
    while True:
        nxt = value * 16
        if nxt > _MAX_KNOB:
            return None
        b = f(nxt)
        if b is None:  # bounded: the largest valid value (its bytes may exceed `stop_above`)
            return f(_largest_valid(f, value, nxt))
        if b > stop_above:
            return None
        if b == f(value):  # bytes stopped growing (TT-Rec with every table full): bounded
            return b
        value = nxt


def _expand_increasing(f: _Bytes, low: int, budget: int) -> tuple[int, int | None]:
    """(good, bad) knob values with f(good) <= budget < f(bad); bad None if no valid value exceeds it.

    Extrapolates along the secant of the last two points (bytes are near affine in rows), so a
    few builds reach the budget's neighbourhood.
    """
    v0, b0 = low, f(low)
    v1 = 2 * low
    while True:
        b1 = f(v1)
        if b1 is None:  # bounded: the largest valid value decides
            top = _largest_valid(f, v0, v1)
            return (top, None) if f(top) <= budget else (v0, top)  # type: ignore[operator]
        if b1 > budget:
            return v0, v1
        if b1 == b0:  # bytes stopped growing: every value from here fits
            return v1, None
        slope = (b1 - b0) / (v1 - v0)  # type: ignore[operator]
        guess = v1 + math.ceil((budget - b1) / slope * 1.02) + 1 if slope > 0 else 2 * v1
        guess = min(max(guess, v1 + 1), 1024 * v1, _MAX_KNOB)
        if guess <= v1:
            return (v1, None)
        v0, b0, v1 = v1, b1, guess


def _expand_decreasing(
    f: _Bytes, low: int, budget: int, method: MethodSpec, counted: str, field: str
) -> tuple[int, int]:
    """(good, bad) with f(good) <= budget < f(bad), bad < good, on the decreasing side of the bytes."""
    value = low
    while value * 2 <= _MAX_KNOB:
        b = f(value * 2)
        if b is None or b >= f(value):  # type: ignore[operator]
            break
        if b <= budget:
            return value * 2, value
        value *= 2
    knob, minimum = _decreasing_min(f, low)
    if budget < minimum:
        raise _below_minimum(method, budget, minimum, f"{field}={knob}", counted)
    bad = max(v for v, b in f.cache.items() if b is not None and b > budget and v < knob)
    return knob, bad


def _decreasing_min(f: _Bytes, low: int) -> tuple[int, int]:
    """(knob, bytes) at the minimum of a decreasing knob's bytes (unimodal: down, then maybe up)."""
    value, best = low, f(low)
    assert best is not None
    while value * 2 <= _MAX_KNOB:
        b = f(value * 2)
        if b is None or b >= best:
            break
        value, best = value * 2, b
    # the minimum lies in [value / 2, value * 2]: bisect on the sign of f(v + 1) - f(v)
    left, right = max(low, value // 2), value * 2
    if f(right) is None:
        right = _largest_valid(f, value, right)
    while right - left > 1:  # invariant: the minimum is in [left, right] (f unimodal)
        mid = (left + right) // 2
        if f(mid + 1) is not None and f(mid + 1) < f(mid):  # type: ignore[operator]
            left = mid + 1
        else:
            right = mid
    # bytes need not be exactly unimodal (QR's ceil(n / m) makes a noisy floor near the minimum):
    # take the smallest of every value evaluated so far
    knob = min((v for v, b in f.cache.items() if b is not None), key=lambda v: (f.cache[v], v))  # type: ignore[arg-type,return-value]
    return knob, f(knob)  # type: ignore[return-value]


def solve_budget(
    spec: EmbeddingSpec,
    budget_bytes: int,
    optimizer: SparseOptimizer,
    method: MethodSpec | None = None,
    include_optimizer: bool = True,
    min_fill: float = 0.9,
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

    Raises:
        ValueError: the budget is below the method's minimum (the message gives it in bytes),
            above its maximum where one exists, or no knob value lands within
            ``[min_fill, 1] x budget`` (the message gives the nearest byte counts).
    """
    method = method or spec.method
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be > 0, got {budget_bytes}")
    full = full_table_bytes(spec, optimizer, include_optimizer)
    what = "bytes" if include_optimizer else "parameter bytes"
    counted = f"{what} under the {optimizer.kind} optimizer" if include_optimizer else what

    def fit(solved: EmbeddingSpec) -> BudgetFit:
        report = memory_report(solved, optimizer)
        used = report.total if include_optimizer else report.parameter_bytes
        solved_method = solved.method
        return BudgetFit(solved, solved_method, used, budget_bytes, full, report)

    if getattr(type(method), "budget_field", None):
        return _learned_size(spec, budget_bytes, optimizer, method, include_optimizer, counted, full)
    if not getattr(type(method), "size_field", None):
        fixed = _with_method(spec, method)
        result = fit(fixed)
        if result.bytes > budget_bytes:
            raise ValueError(
                f"budget {budget_bytes} bytes is below the {method.name!r} configuration's fixed "
                f"{result.bytes} {counted}; expected a budget >= {result.bytes}"
            )
        return result

    field = _size_field(method)
    f = _Bytes(spec, method, optimizer, include_optimizer)
    low = _smallest_valid(f, field)
    increasing = getattr(type(method), "size_increasing", True)
    if increasing:
        minimum = f(low)
        assert minimum is not None
        if budget_bytes < minimum:
            raise _below_minimum(method, budget_bytes, minimum, f"{field}={low}", counted)
        good, bad = _expand_increasing(f, low, budget_bytes)
        if bad is None:  # bounded, and every valid value fits the budget
            return _at_maximum(fit(with_size(spec, method, good)), min_fill, method, counted, f"{field}={good}")
    else:
        maximum = f(low)
        assert maximum is not None
        if maximum <= budget_bytes:
            return _at_maximum(fit(with_size(spec, method, low)), min_fill, method, counted, f"{field}={low}")
        good, bad = _expand_decreasing(f, low, budget_bytes, method, counted, field)
    good, bad = _boundary(f, good, bad, budget_bytes)
    result = fit(with_size(spec, method, good))
    near = f"{field}={good} uses {f(good)} and {field}={bad} uses {f(bad)} {counted}"
    return _checked(result, min_fill, method, counted, near)


def _learned_size(
    spec: EmbeddingSpec,
    budget: int,
    optimizer: SparseOptimizer,
    method: MethodSpec,
    include_optimizer: bool,
    counted: str,
    full: int,
) -> BudgetFit:
    """Methods whose exported size is learned (OptEmbed, PEP; ``budget_field``) take the budget as
    their export target: `embtab.search` prunes to it after training. `bytes` is that target;
    `report` is the training allocation. The budget must cover the smallest export
    (``method.floor_method()``: no row kept, the narrowest width)."""
    floor = spec_bytes(_with_method(spec, method.floor_method()), optimizer, include_optimizer)  # type: ignore[attr-defined]
    if budget < floor:
        raise _below_minimum(method, budget, floor, "no row kept", counted)
    target = {type(method).budget_field: budget, "budget_optimizer": optimizer.kind if include_optimizer else ""}  # type: ignore[attr-defined]
    solved = _with_method(spec, replace(method, **target))
    return BudgetFit(solved, solved.method, budget, budget, full, memory_report(solved, optimizer))


def _below_minimum(method: MethodSpec, budget: int, minimum: int, at: str, counted: str) -> ValueError:
    return ValueError(
        f"budget {budget} bytes is below the minimum of method {method.name!r} for these features: "
        f"{minimum} {counted} (at {at}); expected a budget >= {minimum}"
    )


def _at_maximum(result: BudgetFit, min_fill: float, method: MethodSpec, counted: str, at: str) -> BudgetFit:
    if result.bytes < min_fill * result.budget_bytes:
        raise ValueError(
            f"budget {result.budget_bytes} bytes is above the maximum of method {method.name!r} for "
            f"these features: {result.bytes} {counted} (at {at}); expected a budget <= "
            f"{int(result.bytes / min_fill)} (it must be at least {min_fill:.0%} used)"
        )
    return result


def _checked(result: BudgetFit, min_fill: float, method: MethodSpec, counted: str, near: str) -> BudgetFit:
    if result.bytes > result.budget_bytes:
        raise AssertionError(f"solved configuration uses {result.bytes} > budget {result.budget_bytes}")
    if result.bytes < min_fill * result.budget_bytes:
        raise ValueError(
            f"budget {result.budget_bytes} bytes cannot be filled to {min_fill:.0%} by method "
            f"{method.name!r}: {near}; expected a budget in reach of one of them "
            f"(at most {result.bytes / min_fill:.0f} bytes for the largest fitting one)"
        )
    return result
