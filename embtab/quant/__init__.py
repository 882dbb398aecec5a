"""Low precision: fp16 training tables, quantization-aware training (LPT, ALPT), IntN export.

- `embtab.quant.precision`: the training precisions (fp32, fp16) and their bytes.
- `embtab.quant.spec`: `LowPrecision`, the spec's fp16 rounding and QAT settings.
- `embtab.quant.rows`: the touched rows of each fused update, with their gradient.
- `embtab.quant.training`: stochastic fp16 rounding, LPT and ALPT (`embtab.fuse` attaches them).
- `embtab.quant.export`: fp32/fp16/int8/int4/int2 export on fbgemm's inference kernels.
"""

from embtab.quant.precision import PRECISIONS, check_precision, data_type, element_bytes
from embtab.quant.spec import LowPrecision

__all__ = ["PRECISIONS", "LowPrecision", "check_precision", "data_type", "element_bytes"]
