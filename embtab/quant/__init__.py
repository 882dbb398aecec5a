"""Low precision: fp16 training tables, quantization-aware training (LPT, ALPT), IntN export."""

from embtab.quant.precision import PRECISIONS, check_precision, data_type, element_bytes

__all__ = ["PRECISIONS", "check_precision", "data_type", "element_bytes"]
