"""How low-precision tables train: fp16 rounding and quantization-aware training (LPT, ALPT)."""

from __future__ import annotations

from dataclasses import dataclass

FP16_ROUNDINGS: tuple[str, ...] = ("stochastic", "nearest")
QAT_SCHEMES: tuple[str, ...] = ("lpt", "alpt")
QAT_BITS: tuple[int, ...] = (8, 4, 2)
DEFAULT_QAT = "alpt"  # the scheme a model served at int8/int4/int2 trains with unless told (a learned step per row)


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
        step: LPT's step, ALPT's initial step; None: from `reach`, else the table's init bound /
            2^(bits-2), a grid reaching twice the initialization range (enough for small learning
            rates only: row-wise Adagrad at lr 0.5 moves weights to |w| ~ 3-6 within an epoch).
        reach: the largest |w| the grid holds, for any bit width: step = reach / 2^(bits-1) (set
            it, or `step`, not both; e.g. from a trained fp32 model's weights).
        table_steps: per-logical-table overrides of `step` as ``((table_name, step), ...)``.
        step_lr: learning rate of ALPT's step optimizer (Adam on the touched rows' steps).
        tables: logical tables trained quantized (empty: every table).
    """

    fp16_rounding: str = "stochastic"
    qat: str | None = None
    bits: int = 8
    step: float | None = None
    step_lr: float = 2e-5
    tables: tuple[str, ...] = ()
    table_steps: tuple[tuple[str, float], ...] = ()
    reach: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tables", tuple(self.tables))
        steps = self.table_steps.items() if isinstance(self.table_steps, dict) else self.table_steps
        object.__setattr__(self, "table_steps", tuple((str(n), float(s)) for n, s in steps))
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
        for name, step in (("step", self.step), ("reach", self.reach), *self.table_steps):
            if step is not None and not step > 0:
                raise ValueError(f"low_precision step of {name!r} must be > 0, got {step}")
        if self.step is not None and self.reach is not None:
            raise ValueError(
                f"low_precision sets both step ({self.step}) and reach ({self.reach}); expected one of them"
            )
        if not self.step_lr > 0:
            raise ValueError(f"low_precision.step_lr must be > 0, got {self.step_lr}")

    def quantizes(self, table: str) -> bool:
        """Whether logical table `table` trains quantized."""
        return self.qat is not None and (not self.tables or table in self.tables)

    def state_bytes(self, rows: int) -> int:
        """Bytes of QAT state of a quantized physical table of `rows` rows: ALPT's fp32 step and its
        Adam's two moments per row, LPT's one step."""
        return 12 * rows if self.qat == "alpt" else 4

    def step_of(self, table: str) -> float | None:
        """The configured step of logical table `table` (None: the default rule)."""
        step = dict(self.table_steps).get(table, self.step)
        if step is None and self.reach is not None:
            return self.reach / 2 ** (self.bits - 1)
        return step

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1
