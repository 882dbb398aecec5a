"""Counting a configuration: its bytes and parameters, from tables built on the meta device.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from embtab.collection import EmbeddingTables, MemoryReport
from embtab.config import EmbeddingSpec, SparseOptimizer
from embtab.methods.full import FullTable
from embtab.quant.precision import SERVED_PRECISIONS, check_served_precision, served_table_bytes

Measure = Literal[
    "bytes", "parameter_bytes", "parameters", "served_fp32", "served_fp16", "served_int8", "served_int4", "served_int2"
]


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


def served_bytes(tables: list[tuple[int, int]], own_bytes: int) -> tuple[int, ...]:
    """Served bytes of physical tables ``[(rows, dim), ...]`` at each export precision."""
    return tuple(sum(served_table_bytes(r, d, p) for r, d in tables) + own_bytes for p in SERVED_PRECISIONS)


def meta_tables(spec: EmbeddingSpec) -> EmbeddingTables:
    meta = torch.device("meta")
    try:
        with meta:  # methods' own buffers (e.g. managed collisions' id map) land on meta too
            return EmbeddingTables(spec, device=meta)
    except (RuntimeError, NotImplementedError):  # a method that needs real tensors to build
        return EmbeddingTables(spec, device=meta)


def cost_of(report: MemoryReport, methods: list[torch.nn.Module]) -> Cost:
    parameters = sum(t.rows * t.dim for t in report.tables.values())
    parameters += sum(p.numel() for m in methods for p in m.parameters())
    served = served_bytes([(t.rows, t.dim) for t in report.tables.values()], sum(m.extra_bytes() for m in methods))
    return Cost(report.total, report.parameter_bytes, parameters, served)


def memory_report(spec: EmbeddingSpec, optimizer: SparseOptimizer | None) -> MemoryReport:
    """`spec`'s `MemoryReport`, from tables built on the meta device (nothing table-sized allocated)."""
    return meta_tables(spec).memory_bytes(optimizer)


def spec_cost(spec: EmbeddingSpec, optimizer: SparseOptimizer) -> Cost:
    """`spec`'s bytes (with and without optimizer state) and parameters."""
    tables = meta_tables(spec)
    return cost_of(tables.memory_bytes(optimizer), list(tables.methods.values()))


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


def measure_of(include_optimizer: bool, served_precision: str | None = None) -> Measure:
    if served_precision is not None:
        check_served_precision(served_precision, "budget")
        return f"served_{served_precision}"  # type: ignore[return-value]
    return "bytes" if include_optimizer else "parameter_bytes"


def unit_of(measure: Measure, optimizer: SparseOptimizer) -> str:
    if measure.startswith("served_"):
        return f"bytes served at {measure.removeprefix('served_')} (fbgemm's inference rows)"
    return {
        "bytes": f"bytes under the {optimizer.kind} optimizer",
        "parameter_bytes": "parameter bytes",
        "parameters": "parameters",
    }[measure]


