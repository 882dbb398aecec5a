"""Stored precision of a physical table while it trains: what fbgemm's fused kernels hold.

fbgemm's CPU training kernels update fp32 and fp16 weights (bf16 forward and int8 backward are not
implemented on CPU), so those are the two training precisions. Lower precisions are reached by
quantization-aware training (`embtab.quant.qat`) and by export (`embtab.quant.export`).
"""

from __future__ import annotations

from torchrec.modules.embedding_configs import DataType

PRECISIONS: tuple[str, ...] = ("fp32", "fp16")

_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}
_ELEMENT_BYTES = {"fp32": 4, "fp16": 2}


def check_precision(precision: str, where: str) -> None:
    """Raise a clear error unless `precision` is one a table can train at."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"{where}: precision {precision!r} is not a training precision; expected one of "
            f"{PRECISIONS} (int8/int4/int2 come from quantization-aware training or export)"
        )


def data_type(precision: str) -> DataType:
    """torchrec's `DataType` for a table stored at `precision`."""
    check_precision(precision, "physical table")
    return _DATA_TYPES[precision]


def element_bytes(precision: str) -> int:
    """Bytes of one stored weight at `precision`."""
    check_precision(precision, "physical table")
    return _ELEMENT_BYTES[precision]
