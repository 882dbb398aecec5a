"""Stored precision of a physical table: what fbgemm's fused kernels hold while it trains, and what
its inference kernels hold when it is served.

fbgemm's CPU training kernels update fp32 and fp16 weights (bf16 forward and int8 backward are not
implemented on CPU), so those are the two training precisions. Lower precisions are reached by
quantization-aware training (`embtab.quant.training`) and by export (`embtab.quant.export`), whose
rows are counted here (`served_row_bytes`, `served_table_bytes`) with fbgemm's own row-size rule,
so that a budget can be solved in served bytes.
"""

from __future__ import annotations

from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import align_to_cacheline, rounded_row_size_in_bytes
from torchrec.modules.embedding_configs import DataType

PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
SERVED_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4", "int2")
ROW_ALIGNMENT = 4  # bytes; torchrec's default 16 makes an int8 width-16 row 32 bytes instead of 20

_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}
_ELEMENT_BYTES = {"fp32": 4, "fp16": 2}
_SPARSE_TYPES = {
    "fp32": SparseType.FP32,
    "fp16": SparseType.FP16,
    "int8": SparseType.INT8,
    "int4": SparseType.INT4,
    "int2": SparseType.INT2,
}


def check_precision(precision: str, where: str) -> None:
    """Raise a clear error unless `precision` is one a table can train at."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"{where}: precision {precision!r} is not a training precision; expected one of "
            f"{PRECISIONS} (int8/int4/int2 come from quantization-aware training or export)"
        )


def check_served_precision(precision: str, where: str) -> None:
    """Raise a clear error unless `precision` is one fbgemm's inference kernels serve."""
    if precision not in SERVED_PRECISIONS:
        raise ValueError(f"{where}: export precision {precision!r}; expected one of {SERVED_PRECISIONS}")


def data_type(precision: str) -> DataType:
    """torchrec's `DataType` for a table stored at `precision`."""
    check_precision(precision, "physical table")
    return _DATA_TYPES[precision]


def element_bytes(precision: str) -> int:
    """Bytes of one stored weight at `precision`."""
    check_precision(precision, "physical table")
    return _ELEMENT_BYTES[precision]


def served_row_bytes(dim: int, precision: str) -> int:
    """Bytes of one row of width `dim` in fbgemm's inference kernel at `precision`: the elements,
    an IntN row's fp16 scale and bias (4 B), padded to `ROW_ALIGNMENT` (width 16: 64 / 32 / 20 /
    12 / 8 B at fp32 / fp16 / int8 / int4 / int2)."""
    check_served_precision(precision, "served table")
    return rounded_row_size_in_bytes(dim, _SPARSE_TYPES[precision], ROW_ALIGNMENT)


def served_table_bytes(rows: int, dim: int, precision: str) -> int:
    """Bytes fbgemm's inference kernel allocates for a table: its rows, padded to a 128-byte cache
    line (`embtab.quant.export.kernel_bytes` reads the same from the kernels' buffers)."""
    return align_to_cacheline(rows * served_row_bytes(dim, precision))
