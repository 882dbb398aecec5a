"""embtab.search.sparse: the CSR charge is what the real CSR export allocates."""

import pytest
import torch

from embtab.search.sparse import csr_bytes, csr_charge, csr_export, csr_parameters, csr_shift


def pruned_table(rows: int = 300, dim: int = 16, keep: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(rows, dim, generator=g)
    return values * (torch.rand(rows, dim, generator=g) < keep)


@pytest.mark.parametrize("keep", [0.0, 0.03, 0.5, 1.0])
def test_charge_equals_the_real_allocation_of_the_export(keep):
    table = pruned_table(keep=keep)
    matrix = csr_export(table)
    assert torch.equal(matrix.to_dense(), table)  # the export is the table
    nonzeros = int((table != 0).sum())
    assert csr_bytes(matrix) == csr_charge(300, nonzeros) == 8 * nonzeros + 4 * 301
    assert csr_parameters(300, nonzeros) == 2 * nonzeros + 301


def test_shift_keeps_the_largest_margins_within_the_budget():
    margins = {"a": torch.randn(100, 8, generator=torch.Generator().manual_seed(1)), "b": torch.randn(50, 8)}
    budget = 4 * (101 + 51) + 8 * 200  # room for 200 elements
    shift = csr_shift(margins, budget)
    kept = sum(int((m > shift).sum()) for m in margins.values())
    assert kept == 200
    assert sum(csr_charge(m.shape[0], int((m > shift).sum())) for m in margins.values()) <= budget
    assert csr_shift(margins, 10**9) == 0.0
    with pytest.raises(ValueError, match="below the row pointers"):
        csr_shift(margins, 100)
