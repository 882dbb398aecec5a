"""How low-precision tables train: fp16 rounding and quantization-aware training (LPT, ALPT)."""

from __future__ import annotations

from dataclasses import dataclass

FP16_ROUNDINGS: tuple[str, ...] = ("stochastic", "nearest")
QAT_SCHEMES: tuple[str, ...] = ("lpt", "alpt")
QAT_BITS: tuple[int, ...] = (8, 4, 2)


@dataclass(frozen=True)
class LowPrecision:
    """Training options for tables stored below fp32 (the `low_precision` of an `EmbeddingSpec`).

    Args:
        fp16_rounding: ``"stochastic"``: after each fused update embtab recomputes the touched fp16
            rows' update in fp32 and rounds it stochastically (unbiased; small updates land on
            average); ``"nearest"``: keep the fused CPU kernel's round-to-nearest (fbgemm ignores
            ``stochastic_rounding`` on CPU), where an update below half an fp16 ulp never lands.
        qat: quantization-aware training of the tables: None, ``"lpt"`` (a fixed step per table,
            weights stochastically rounded onto the grid after each fused update) or ``"alpt"``
            (Li et al., AAAI 2023: a learnable step per row, trained by its own Adam).
        bits: integer width of the quantized weights (8, 4 or 2); signed grid
            ``-2^(bits-1) .. 2^(bits-1) - 1`` times the step.
        step: LPT's step, ALPT's initial step; None: the table's init bound / 2^(bits-2), a grid
            reaching twice the initialization range.
        step_lr: learning rate of ALPT's step optimizer (Adam on the touched rows' steps).
        tables: logical tables trained quantized (empty: every table).
    """

    fp16_rounding: str = "stochastic"
    qat: str | None = None
    bits: int = 8
    step: float | None = None
    step_lr: float = 2e-5
    tables: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tables", tuple(self.tables))
        if self.fp16_rounding not in FP16_ROUNDINGS:
            raise ValueError(
                f"low_precision.fp16_rounding is {self.fp16_rounding!r}; expected one of {FP16_ROUNDINGS}"
            )
        if self.qat is not None and self.qat not in QAT_SCHEMES:
            raise ValueError(f"low_precision.qat is {self.qat!r}; expected None or one of {QAT_SCHEMES}")
        if self.bits not in QAT_BITS:
            raise ValueError(
                f"low_precision.bits is {self.bits!r}; expected one of {QAT_BITS} (the widths "
                "fbgemm's IntN inference kernels serve)"
            )
        if self.step is not None and not self.step > 0:
            raise ValueError(f"low_precision.step must be > 0, got {self.step}")
        if not self.step_lr > 0:
            raise ValueError(f"low_precision.step_lr must be > 0, got {self.step_lr}")

    def quantizes(self, table: str) -> bool:
        """Whether logical table `table` trains quantized."""
        return self.qat is not None and (not self.tables or table in self.tables)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1
