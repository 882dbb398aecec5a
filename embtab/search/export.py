"""From a trained masked model (OptEmbed, PEP) to compact tables that hold only what it kept.

A masked method exposes ``scores(weights) -> (row scores, column scores)``: at a shift ``s`` a row
(column) survives when its score exceeds ``s``. `fit_shift` finds the smallest shift whose export
fits a byte budget (the ``target sparsity``); `plans` reads the masked model's own outputs for every
row (its `combine` in eval mode, so the export reproduces them exactly) and keeps the rows and
columns that have a nonzero element; `build_compact` allocates `PrunedTable`s for them and fills
the bitmaps, the columns and the values. The same plans, with fresh or rewound values, give the
retraining architecture (`fresh`, `rewind`).

Bytes are `EmbeddingTables.memory_bytes` of the compact tables: kept rows plus the shared row at
the stored width, the optimizer's state for them, and the remap (1/4 byte per id).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch

from embtab.budget import BelowMinimum
from embtab.collection import EmbeddingTables
from embtab.config import EmbeddingSpec, MethodSpec, SparseOptimizer
from embtab.fused_state import table_parameters as table_weights
from embtab.methods.base import LearnedSizeSpec, MaskedMethod, TableMethod
from embtab.methods.full import FullTable
from embtab.methods.pruned import PrunedMethod, PrunedTable, pruned_parameter_bytes

CHUNK_ROWS = 1 << 16


@dataclass(frozen=True)
class TablePlan:
    """What one table keeps: a row mask ``[n]``, the stored columns ``[w]`` (ascending, ``w`` a
    multiple of 4) and the kept rows' values ``[K, w]`` (None: torchrec's fresh initialization)."""

    keep: torch.Tensor
    columns: torch.Tensor
    values: torch.Tensor | None

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    @property
    def width(self) -> int:
        return int(self.columns.numel())


@dataclass(frozen=True)
class TableScores:
    """Row and column scores of one table, each sorted in descending order."""

    cardinality: int
    rows: torch.Tensor
    columns: torch.Tensor

    def size_at(self, shift: float) -> tuple[int, int]:
        """(kept rows, stored width) at `shift`: scores above it survive; width rounds up to 4."""
        kept = _count_above(self.rows, shift)
        width = max(4, -(-_count_above(self.columns, shift) // 4) * 4)
        return kept, width


def _count_above(descending: torch.Tensor, shift: float) -> int:
    return int(torch.searchsorted(-descending, torch.tensor(-shift, dtype=descending.dtype)))


def export_bytes(cardinality: int, kept: int, width: int, optimizer: SparseOptimizer | None) -> int:
    """Bytes `EmbeddingTables.memory_bytes` counts for a `PrunedTable` of this size."""
    state = optimizer.state_bytes(kept + 1, width) if optimizer else 0
    return pruned_parameter_bytes(cardinality, kept, width) + state


def masked_methods(tables: EmbeddingTables) -> dict[str, MaskedMethod]:
    """The tables' methods, checked to be masked ones (`MaskedMethod`: ``scores`` and a ``shift``)."""
    methods = {}
    for name, method in tables.methods.items():
        if not isinstance(method, MaskedMethod):
            raise ValueError(
                f"table {name!r} uses {type(method).__name__}, which has no learned mask to export; "
                "expected OptEmbed, PEP or DNIS"
            )
        methods[name] = method
    return methods


def table_scores(tables: EmbeddingTables, weights: Mapping[str, torch.Tensor]) -> dict[str, TableScores]:
    """Every table's sorted row and column scores from its physical `weights` (by table name)."""
    out = {}
    for name, method in masked_methods(tables).items():
        rows, columns = method.scores(_physical(method, weights))
        out[name] = TableScores(
            method.table.cardinality,
            torch.sort(rows, descending=True).values,
            torch.sort(columns, descending=True).values,
        )
    return out


def _physical(method: TableMethod, weights: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    return [weights[p.name] for p in method.physical_tables]


def bytes_at(scores: Mapping[str, TableScores], shift: float, optimizer: SparseOptimizer | None) -> int:
    """Bytes of the export at `shift`."""
    return sum(export_bytes(s.cardinality, *s.size_at(shift), optimizer) for s in scores.values())


def budget_target(method: MethodSpec) -> tuple[int, SparseOptimizer | None]:
    """(bytes, optimizer whose state counts) a solved spec asks of its export (`solve_budget` sets
    ``budget_bytes`` and ``budget_optimizer``); a budget of 0 means none."""
    if not isinstance(method, LearnedSizeSpec):
        return 0, None
    kind = method.budget_optimizer
    return int(method.budget_bytes), SparseOptimizer(kind) if kind else None


def fit_shift(scores: Mapping[str, TableScores], budget: int, optimizer: SparseOptimizer | None) -> float:
    """The smallest shift >= 0 (0 or a score) whose export fits `budget` bytes.

    Raises:
        BelowMinimum: even keeping no row does not fit (`nearest` is that floor).
    """
    candidates = torch.cat([torch.zeros(1)] + [torch.cat([s.rows, s.columns]) for s in scores.values()])
    candidates = torch.unique(candidates[torch.isfinite(candidates) & (candidates >= 0)])
    if bytes_at(scores, 0.0, optimizer) <= budget:
        return 0.0
    top = float(candidates[-1])
    floor = bytes_at(scores, top, optimizer)
    if floor > budget:
        raise BelowMinimum(
            f"budget {budget} bytes is below the smallest export of these tables: {floor} bytes "
            f"(pruned as far as their method allows); expected a budget >= {floor}",
            method="export", budget=budget, nearest=floor, unit="bytes of the export",
        )
    low, high = 0, len(candidates) - 1  # bytes_at(candidates[low]) > budget >= bytes_at(candidates[high])
    while high - low > 1:
        mid = (low + high) // 2
        if bytes_at(scores, float(candidates[mid]), optimizer) <= budget:
            high = mid
        else:
            low = mid
    return float(candidates[high])


def set_shift(tables: EmbeddingTables, shift: float) -> None:
    """Raise every masked method's keep threshold by `shift` (a row/element survives above it)."""
    for method in masked_methods(tables).values():
        method.shift.fill_(shift)


@torch.no_grad()
def plans(tables: EmbeddingTables, weights: Mapping[str, torch.Tensor]) -> dict[str, TablePlan]:
    """What each table keeps: rows and columns where the masked model's eval output is nonzero."""
    out = {}
    for name, method in masked_methods(tables).items():
        was_training = method.training
        method.eval()
        physical = _physical(method, weights)
        rows = torch.cat(
            [
                _combine_rows(method, [w[start : start + CHUNK_ROWS] for w in physical], start)
                for start in range(0, method.table.cardinality, CHUNK_ROWS)
            ]
        )
        method.train(was_training)
        nonzero = rows != 0
        keep = nonzero.any(1)
        columns = _pad_columns(nonzero.any(0))
        out[name] = TablePlan(keep, columns, rows[keep][:, columns])
    return out


def _combine_rows(method: MaskedMethod, rows: list[torch.Tensor], first: int) -> torch.Tensor:
    """`method`'s output for consecutive rows of its tables from id `first` on (with those ids
    for a combine that uses them: AutoSrh's frequency groups)."""
    if not method.combine_uses_ids:
        return method.combine(rows)
    ids = torch.arange(first, first + rows[0].shape[0], device=rows[0].device)
    return method.combine(rows, ids)  # type: ignore[call-arg]


def _pad_columns(used: torch.Tensor) -> torch.Tensor:
    """Indices of the used columns plus the lowest unused ones, to a multiple of 4 (at least 4)."""
    width = max(4, -(-int(used.sum()) // 4) * 4)
    order = torch.sort((~used).to(torch.int8), stable=True).indices[:width]
    return torch.sort(order).values


def fresh(table_plans: Mapping[str, TablePlan]) -> dict[str, TablePlan]:
    """The same rows and columns, initialized afresh (OptEmbed's retraining)."""
    return {name: replace(plan, values=None) for name, plan in table_plans.items()}


def rewind(table_plans: Mapping[str, TablePlan], initial: Mapping[str, torch.Tensor]) -> dict[str, TablePlan]:
    """The kept elements at their initial values, the pruned ones zero (PEP's lottery-ticket retrain).

    `initial` holds each table's weights before training, by table name.
    """
    out = {}
    for name, plan in table_plans.items():
        if plan.values is None:
            raise ValueError(f"table {name!r}: the plan has no values to take the element mask from")
        start = initial[name][plan.keep][:, plan.columns]
        out[name] = replace(plan, values=start * (plan.values != 0))
    return out


def trained(table_plans: Mapping[str, TablePlan], weights: Mapping[str, torch.Tensor]) -> dict[str, TablePlan]:
    """The plans with the values of retrained compact tables (`weights` by physical table name)."""
    return {
        name: replace(plan, values=weights[PrunedTable.physical_name(name)][: plan.kept])
        for name, plan in table_plans.items()
    }


def compact_spec(spec: EmbeddingSpec, table_plans: Mapping[str, TablePlan], freeze_zeros: bool) -> EmbeddingSpec:
    """`spec`'s features with a `PrunedTable` of each plan's size for every table."""
    missing = [t.name for t in spec.tables() if t.name not in table_plans]
    if missing:
        raise ValueError(f"no plan for table {missing[0]!r}; expected one for every table of the spec")
    methods = tuple(
        (name, PrunedTable(kept=plan.kept, width=plan.width, freeze_zeros=freeze_zeros))
        for name, plan in table_plans.items()
    )
    return EmbeddingSpec(features=spec.features, dim=spec.dim, method=FullTable(), table_methods=methods)


def build_compact(
    spec: EmbeddingSpec, table_plans: Mapping[str, TablePlan], freeze_zeros: bool = False
) -> EmbeddingTables:
    """Compact tables for the plans: bitmaps, columns and values filled, the shared row zero.

    ``freeze_zeros=True`` for retraining (zeros stay zero), False for inference (pooling in-kernel).
    """
    tables = EmbeddingTables(compact_spec(spec, table_plans, freeze_zeros))
    weights = table_weights(tables)
    with torch.no_grad():
        for name, plan in table_plans.items():
            method = tables.table_methods[name]
            if not isinstance(method, PrunedMethod):
                raise TypeError(f"table {name!r}: expected a pruned table, built {type(method).__name__}")
            method.set_rows(plan.keep)
            method.columns.copy_(plan.columns)
            weight = weights[method.physical_tables[0].name]
            if plan.values is not None:
                weight[: plan.kept] = plan.values
            weight[plan.kept :] = 0
    return tables


def quantize(tables: EmbeddingTables, precision: str = "int8") -> EmbeddingTables:
    """Row-wise quantized tables (fbgemm inference kernels, rows aligned to 4 bytes), in place;
    `precision` is one of `embtab.quant.export.EXPORT_PRECISIONS`."""
    from embtab.quant.export import quantize_in_place

    return quantize_in_place(tables, {name: precision for name in tables.physical_tables})


def allocated_bytes(tables: EmbeddingTables) -> int:
    """Bytes of every tensor the tables hold: weights of any dtype (torchrec's quantized collections
    expose their int8 rows, scale and bias included, in the state dict), remap buffers, projections."""
    tensors = list(tables.state_dict(keep_vars=True).values()) + list(tables.buffers())
    unique = {(t.data_ptr(), t.numel()): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())
