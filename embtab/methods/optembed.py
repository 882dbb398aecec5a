"""OptEmbed's supernet (Lyu et al., CIKM 2022, arXiv 2208.04482): learned row pruning + width masks.

Per logical table ("field") one learnable threshold ``t`` (initialized 0). A row ``e`` is kept when
``||e||_1 - t > 0``; a pruned row outputs zero. The indicator's gradient is the paper's straight-
through estimator: ``2 - 4|z|`` for ``|z| <= 0.4``, ``0.4`` for ``0.4 < |z| <= 1``, 0 beyond, where
``z = ||e||_1 - t``; the row itself gets the gradient of ``mask * e`` (so a pruned row is still
trained through ``z``). The threshold trains on plain SGD at its own rate ``t_lr`` on the loss plus
the paper's ``alpha * exp(-t)``, inside the backward pass (`ThresholdSGD`, registered as an
in-backward optimizer, so `embtab.dense_parameters` leaves it out of the dense Adam).

Width masks: while training, every looked-up vector keeps only its first ``d`` dimensions, ``d``
drawn uniformly from the candidate widths ``width_step, 2 * width_step, ..., D`` (multiples of 4:
fbgemm's kernels need them for the exported tables) per id (``sampling="id"``; for one-id features
that is the paper's per-sample draw) or once per table and batch (``sampling="batch"``). In eval
mode the width is ``eval_width`` (D unless a search sets it) and the kept rows are those with
``z > shift`` (``shift`` 0 unless a byte budget raises it): `embtab.search` sets both to score
candidates, then exports the kept rows and widths to a `PrunedTable`.

The mask needs each id's own vector, so lookups are per id (``pooling_commutes = False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from embtab.config import LogicalTable, MethodSpec
from embtab.methods.base import LearnedSizeSpec, MaskedMethod, PhysicalTable
from embtab.methods.pruned import PrunedTable
from embtab.registry import MethodKind, register_method

SAMPLINGS: tuple[str, ...] = ("id", "batch")
INITS: tuple[str, ...] = ("xavier", "torchrec")


def xavier_range(rows: int, dim: int) -> tuple[float, float]:
    """Xavier-uniform bounds of a ``rows x dim`` table (the reference codes' initialization)."""
    bound = (6.0 / (rows + dim)) ** 0.5
    return (-bound, bound)


class StraightThroughStep(torch.autograd.Function):
    """``1[z > 0]`` forward; OptEmbed's piecewise-linear surrogate gradient backward."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return grad * ste_slope(z)


def ste_slope(z: torch.Tensor) -> torch.Tensor:
    """The estimator's derivative: 2 - 4|z| on [-0.4, 0.4], 0.4 up to |z| = 1, then 0."""
    a = z.abs()
    return torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1, torch.full_like(a, 0.4), torch.zeros_like(a)))


class ThresholdSGD(torch.optim.SGD):
    """SGD on ``loss + alpha * sum exp(-t)``: adds the regularizer's gradient ``-alpha * exp(-t)``."""

    def __init__(self, params: Any, lr: float, alpha: float) -> None:
        super().__init__(params, lr=lr)
        self.alpha = alpha

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.add_(torch.exp(-p), alpha=-self.alpha)
        return super().step(closure)


@register_method(MethodKind.LEARNED_SIZE)
@dataclass(frozen=True)
class OptEmbed(LearnedSizeSpec):
    """The OptEmbed supernet for every table it is given (train it, then `embtab.search`).

    Args:
        t_lr: SGD learning rate of the thresholds (the reference grid: 1e-2, 1e-3, 1e-4).
        alpha: weight of the regularizer ``alpha * sum_f exp(-t_f)`` (grid 1e-4 .. 1e-6).
        width_step: candidate widths are its multiples up to the table's width (a multiple of 4).
        sampling: ``"id"`` (a width per looked-up id) or ``"batch"`` (one per table and batch).
        init: ``"xavier"`` (the reference: Xavier-uniform over the table, so row L1 norms start
            inside the estimator's window around the threshold) or ``"torchrec"`` (U(+-sqrt(1/n))).
        budget_bytes: bytes the export must fit (0: no budget; `embtab.budget.solve_budget` sets it).
        budget_optimizer: the sparse optimizer whose state the budget counts ("" for weights only).
    """

    name = "optembed"

    t_lr: float = 1e-2
    alpha: float = 1e-5
    width_step: int = 4
    sampling: str = "id"
    init: str = "xavier"
    budget_bytes: int = 0
    budget_optimizer: str = ""

    def build(self, table: LogicalTable) -> "OptEmbedMethod":
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"table {table.name!r}: sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.width_step < 4 or self.width_step % 4 or table.dim % self.width_step:
            raise ValueError(
                f"table {table.name!r}: width_step must be a multiple of 4 dividing the width "
                f"{table.dim}, got {self.width_step}"
            )
        if self.init not in INITS:
            raise ValueError(f"table {table.name!r}: init must be one of {INITS}, got {self.init!r}")
        if self.t_lr <= 0 or self.alpha < 0:
            raise ValueError(f"table {table.name!r}: expected t_lr > 0 and alpha >= 0, got {self.t_lr}, {self.alpha}")
        return OptEmbedMethod(table, self)

    def floor_method(self) -> MethodSpec:
        """The smallest export: no row kept, the narrowest width."""
        return PrunedTable(kept=0, width=self.width_step)


class OptEmbedMethod(MaskedMethod):
    pooling_commutes = False

    def __init__(self, table: LogicalTable, spec: OptEmbed) -> None:
        super().__init__(table)
        self.sampling = spec.sampling
        init = xavier_range(table.cardinality, table.dim) if spec.init == "xavier" else None
        self.physical_tables = (PhysicalTable(table.name, table.cardinality, table.dim, init=init),)
        self.threshold = nn.Parameter(torch.zeros(()))
        if self.threshold.device.type != "meta":
            apply_optimizer_in_backward(ThresholdSGD, [self.threshold], {"lr": spec.t_lr, "alpha": spec.alpha})
        widths = torch.arange(spec.width_step, table.dim + 1, spec.width_step)
        self.register_buffer("widths", widths, persistent=False)
        self.register_buffer("eval_width", torch.tensor(table.dim), persistent=False)
        self.register_buffer("shift", torch.tensor(0.0), persistent=False)

    @property
    def width_choices(self) -> tuple[int, ...]:
        return tuple(int(w) for w in self.widths)

    def margins(self, rows: torch.Tensor) -> torch.Tensor:
        """``||e||_1 - t`` of rows ``[..., D]``; a row is kept where this exceeds ``shift``."""
        return rows.abs().sum(-1) - self.threshold

    @torch.no_grad()
    def scores(self, weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) scores of the physical weights: a row is kept while its score exceeds the
        shift; the first ``eval_width`` columns always are (+inf), the others never (-inf)."""
        inf = torch.tensor(float("inf"))
        columns = torch.where(torch.arange(self.table.dim) < self.eval_width, inf, -inf)
        return self.margins(weights[0]), columns

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.unsqueeze(0)

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        v = vectors[0]
        keep = StraightThroughStep.apply(self.margins(v) - self.shift)
        return v * keep.unsqueeze(-1) * self._width_mask(v)

    def _width_mask(self, v: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(v.shape[-1], device=v.device)
        if not self.training:
            return (positions < self.eval_width).to(v.dtype)
        shape = v.shape[:-1] if self.sampling == "id" else ()
        width = self.widths[torch.randint(len(self.widths), shape, device=v.device)]
        return (positions < width.unsqueeze(-1)).to(v.dtype)
