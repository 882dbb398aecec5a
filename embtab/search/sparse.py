"""Element-sparse export (PEP): each table's pruned elements as a CSR matrix, and what it costs.

An element-sparse table stores only its non-zero elements. The VLDB 2024 benchmark charges such
methods CSR storage: the non-zero values, one column index per value and one row pointer per row
(plus one). `csr_export` builds that matrix for real (`torch.sparse_csr_tensor`, float32 values and
int32 indices); `csr_bytes` is the bytes it allocates, and `csr_charge` the same figure computed
from the counts alone, which is what a byte budget is solved against (`csr_shift`). The
VLDB-style parameter count of the export is ``2 * nnz + rows + 1`` (values and indices, the index
arrays counted as auxiliary parameters).
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch

from embtab.budget import BelowMinimum

VALUE_BYTES = 4  # float32
INDEX_BYTES = 4  # int32 column indices and row pointers


def csr_export(rows: torch.Tensor) -> torch.Tensor:
    """The ``[n, d]`` matrix `rows` as CSR with float32 values and int32 indices."""
    if rows.dim() != 2:
        raise ValueError(f"csr_export expects a 2-d table, got shape {tuple(rows.shape)}")
    nonzero = rows != 0
    crow = torch.zeros(rows.shape[0] + 1, dtype=torch.int32)
    crow[1:] = torch.cumsum(nonzero.sum(1), 0).to(torch.int32)
    columns = nonzero.nonzero()[:, 1].to(torch.int32)
    values = rows[nonzero].to(torch.float32)
    with warnings.catch_warnings():  # torch's notice that CSR support is in beta says nothing here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow, columns, values, size=tuple(rows.shape), check_invariants=True)


def csr_bytes(matrix: torch.Tensor) -> int:
    """Bytes a CSR tensor allocates: values, column indices and row pointers."""
    parts = (matrix.values(), matrix.col_indices(), matrix.crow_indices())
    return sum(t.numel() * t.element_size() for t in parts)


def csr_charge(rows: int, nonzeros: int) -> int:
    """`csr_bytes` of a ``rows``-row CSR export with `nonzeros` elements, from the counts."""
    return nonzeros * (VALUE_BYTES + INDEX_BYTES) + (rows + 1) * INDEX_BYTES


def csr_parameters(rows: int, nonzeros: int) -> int:
    """The export's parameters as the VLDB benchmark counts sparse storage: values + indices."""
    return 2 * nonzeros + rows + 1


def csr_shift(margins: Mapping[str, torch.Tensor], budget: int) -> float:
    """The smallest shift >= 0 at which the elements with ``margin > shift`` of every table fit
    `budget` bytes of CSR storage (`margins`: each table's ``[n, d]`` element margins).

    Raises:
        BelowMinimum: even with no element kept the row pointers exceed the budget.
    """
    pointers = sum(csr_charge(m.shape[0], 0) for m in margins.values())
    if pointers > budget:
        raise BelowMinimum(
            f"budget {budget} bytes is below the row pointers of the CSR export ({pointers} bytes); "
            f"expected a budget >= {pointers}",
            method="csr export", budget=budget, nearest=pointers, unit="bytes of CSR storage",
        )
    room = (budget - pointers) // (VALUE_BYTES + INDEX_BYTES)
    flat = torch.cat([m.reshape(-1) for m in margins.values()])
    positive = flat[flat > 0]
    if positive.numel() <= room:
        return 0.0
    return float(torch.topk(positive, room + 1).values[-1]) if room >= 0 else float(positive.max())


def csr_sparsity(shapes: Sequence[tuple[int, int]], budget: int) -> float:
    """The smallest share of zeros, the same for every table (`shapes`: each table's ``(rows,
    dim)``), at which the tables' CSR exports fit `budget` bytes (DeepLight's target).

    Raises:
        ValueError: even with no element kept the row pointers exceed the budget.
    """
    pointers = sum(csr_charge(rows, 0) for rows, _ in shapes)
    if pointers > budget:
        raise ValueError(
            f"budget {budget} bytes is below the row pointers of the CSR export ({pointers} bytes); "
            f"expected a budget >= {pointers}"
        )
    elements = sum(rows * dim for rows, dim in shapes)
    room = (budget - pointers) // (VALUE_BYTES + INDEX_BYTES)
    return max(0.0, 1.0 - room / elements)
