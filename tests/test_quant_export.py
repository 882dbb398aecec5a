"""Export of every method to fp32/fp16/int8/int4/int2 on fbgemm's inference kernels, bytes read back."""

import pytest
import torch

from embtab import EmbeddingSpec, EmbeddingTables, FeatureSpec, FullTable
from embtab.methods.hashing_trick import HashingTrick
from embtab.methods.multi_hash import MultiHash
from embtab.methods.multiplex import Multiplexed
from embtab.methods.qr import QREmbedding
from embtab.quant.export import export, kernel_bytes, pack_codes, row_bytes, served_bytes
from embtab.testing import random_kjt

FEATURES = (
    FeatureSpec("user", 50),
    FeatureSpec("item", 30),
    FeatureSpec("hist", 30, pooling="none", table="item"),
)
ROW_BYTES = {"fp32": 64, "fp16": 32, "int8": 20, "int4": 12, "int2": 8}  # width 16, 4-byte alignment
RELATIVE_ERROR = {"fp32": 1e-7, "fp16": 1e-3, "int8": 2e-2, "int4": 0.2, "int2": 0.6}


def outputs(tables: EmbeddingTables, kjt) -> torch.Tensor:
    out = tables(kjt)
    return torch.cat([out.pooled.values().flatten(), out.sequence["hist"].values().flatten()]).detach()


@pytest.mark.parametrize("precision", list(ROW_BYTES))
def test_exported_bytes_are_the_kernels_allocation(precision: str) -> None:
    torch.manual_seed(0)
    served = export(EmbeddingTables(EmbeddingSpec(FEATURES, dim=16)), precision)
    assert row_bytes(served, "user") == row_bytes(served, "item") == ROW_BYTES[precision]
    per_table = [-(-rows * ROW_BYTES[precision] // 128) * 128 for rows in (50, 30)]  # fbgemm pads to 128 B
    assert kernel_bytes(served) == served_bytes(served) == sum(per_table)


@pytest.mark.parametrize(
    "method",
    [FullTable(), HashingTrick(rows=17), MultiHash(rows=19), QREmbedding(collisions=7), Multiplexed(rows=41)],
    ids=lambda m: m.name,
)
@pytest.mark.parametrize("precision", list(ROW_BYTES))
def test_every_method_exports_close_to_its_fp32_model(method, precision: str) -> None:
    torch.manual_seed(0)
    tables = EmbeddingTables(EmbeddingSpec(FEATURES, dim=16, method=method))
    kjt = random_kjt(FEATURES, 8, seed=1)
    reference = outputs(tables, kjt)
    served = export(tables, precision)
    error = (outputs(served, kjt) - reference).abs().max() / reference.abs().max()
    assert error <= RELATIVE_ERROR[precision]
    assert served_bytes(served) < 2 * sum(t.rows * t.dim * 4 for t in tables.physical_tables.values()) + 1024


def test_per_table_precisions_and_unknown_names() -> None:
    tables = EmbeddingTables(EmbeddingSpec(FEATURES, dim=16))
    served = export(tables, "int8", {"item": "int2"})
    assert (row_bytes(served, "user"), row_bytes(served, "item")) == (20, 8)
    with pytest.raises(ValueError, match="unknown tables \\['nope'\\]"):
        export(tables, "int8", {"nope": "int4"})
    with pytest.raises(ValueError, match="export precision 'int3'"):
        export(tables, "int3")


def test_codes_are_packed_lowest_bits_first() -> None:
    codes = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]])
    assert pack_codes(codes, 2).tolist() == [[1 + (2 << 2) + (3 << 4), 255]]
    assert pack_codes(torch.tensor([[5, 10]]), 4).tolist() == [[5 + (10 << 4)]]


@pytest.mark.parametrize("precision", list(ROW_BYTES))
@pytest.mark.parametrize("dim", [8, 16, 40])
def test_served_table_bytes_predict_the_kernels_allocation(precision: str, dim: int) -> None:
    from embtab.quant.precision import served_row_bytes, served_table_bytes

    served = export(EmbeddingTables(EmbeddingSpec(FEATURES, dim=dim)), precision)
    assert served_row_bytes(dim, precision) == row_bytes(served, "user")
    assert kernel_bytes(served) == served_table_bytes(50, dim, precision) + served_table_bytes(30, dim, precision)


@pytest.mark.parametrize("method", [HashingTrick(rows=1), QREmbedding(collisions=1)], ids=lambda m: m.name)
@pytest.mark.parametrize("precision", ["int8", "int4", "int2"])
def test_budget_in_served_bytes_sizes_rows_at_the_intn_row_cost(method, precision: str) -> None:
    from embtab.budget import solve_budget
    from embtab.config import SparseOptimizer

    features = (FeatureSpec("user", 20_000), FeatureSpec("item", 5_000), FeatureSpec("genre", 19))
    spec, optimizer, budget = EmbeddingSpec(features, dim=16), SparseOptimizer("rowwise_adagrad"), 100_000
    fit = solve_budget(spec, budget, optimizer, method=method, served_precision=precision)
    served = export(EmbeddingTables(fit.spec), precision)
    assert fit.bytes == served_bytes(served) <= budget and fit.fill >= 0.9
    fp32 = solve_budget(spec, budget, optimizer, method=method)  # training bytes: 68 B per fp32 row

    def rows(solved: EmbeddingSpec) -> int:
        return sum(t.rows for t in EmbeddingTables(solved).physical_tables.values())

    gain = 68 / ROW_BYTES[precision]
    assert 0.85 * gain < rows(fit.spec) / rows(fp32.spec) < 1.15 * gain
    with pytest.raises(ValueError, match="budget: export precision 'int3'"):
        solve_budget(spec, budget, optimizer, method=method, served_precision="int3")
