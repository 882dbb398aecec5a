"""AutoSrh: dimension search by frequency group (Kong et al., "AutoSrh: An Embedding
Dimensionality Search Framework for Tabular Data Prediction", TKDE 2022), as the VLDB 2024
benchmark runs it.

A table's ids fall into ``groups`` frequency groups (ascending training frequency, about equal
numbers of ids per group, ids of equal count in one group: `frequency_groups`). Each group ``g``
has a weight per dimension, ``alpha[g] in [0, 1]^d`` (initialized to 1), and a looked-up vector is
``e(x) * alpha[group(x)]``. The weights learn with an L1 penalty ``l1 * ||alpha||_1`` on their own
optimizer (the benchmark's: the gradient normalized by its mean magnitude per group, SGD at
``alpha_lr``, clipped to [0, 1]; `NormalizedClippedSGD`), inside the backward pass. The search
stage (`experiments.search.run_autosrh`) then prunes the elements with the smallest
``|e * alpha|`` until the CSR export fits a budget (``shift``, as PEP's), folds ``alpha`` into the
kept values and retrains them with the mask fixed.

The group of every id is a persistent buffer (one int8 per id, counted in the bytes while
searching), filled from training counts by `set_groups`; until then every id is in group 0.
The combine depends on the id (its group), so lookups are per id.

Difference from the benchmark: ``alpha`` learns on the training batches, jointly with the model
(Hetu alternates: embeddings on a training batch, ``alpha`` on a validation batch), and there is
no warm-up stage before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from embtab.config import LogicalTable, MethodSpec
from embtab.methods.base import LearnedSizeSpec, MaskedMethod, PhysicalTable
from embtab.checks import check_int
from embtab.methods.pruned import PrunedTable
from embtab.registry import MethodKind, register_method

MAX_GROUPS = 127  # group indices are stored as int8


def frequency_groups(counts: torch.Tensor, groups: int) -> torch.Tensor:
    """Each id's group ``[n]`` (int64): ids sorted by ascending count are cut into `groups` parts
    of about ``n / groups`` ids; an id takes the part where the first id of its count falls, so
    ids of equal count share a group (rare ids: group 0)."""
    if counts.dim() != 1 or counts.is_floating_point():
        raise ValueError(f"counts must be a 1-d integer tensor, got {counts.dtype} of shape {tuple(counts.shape)}")
    ordered = torch.sort(counts).values
    first = torch.searchsorted(ordered, counts, right=False)
    return torch.div(first * groups, counts.numel(), rounding_mode="floor")


class NormalizedClippedSGD(torch.optim.Optimizer):
    """The benchmark's update of ``alpha``: ``g = grad + l1 * sign(alpha)``, divided by the mean of
    ``|g|`` over each row (group), then ``alpha <- clip(alpha - lr * g, 0, 1)``."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, l1: float) -> None:
        super().__init__(params, {"lr": lr, "l1": l1})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad + group["l1"] * torch.sign(p)
                g = g / (g.abs().mean(-1, keepdim=True) + 1e-8)
                p.sub_(group["lr"] * g).clamp_(0.0, 1.0)


@register_method(MethodKind.LEARNED_SIZE)
@dataclass(frozen=True)
class AutoSrh(LearnedSizeSpec):
    """Per frequency group and dimension soft weights, trained with an L1 penalty; the export
    keeps the largest ``|e * alpha|`` within a budget.

    Args:
        groups: frequency groups per table (the benchmark: 6), at most 127.
        alpha_lr: learning rate of the weights' normalized SGD.
        l1: weight of the L1 penalty on the weights (the benchmark: 1e-5).
        budget_bytes: bytes the CSR export must fit (0: keep every element with a nonzero weight).
        budget_optimizer: the sparse optimizer whose state the budget counts ("" for weights only).
    """

    name = "autosrh"

    groups: int = 6
    alpha_lr: float = 1e-3
    l1: float = 1e-5
    budget_bytes: int = 0
    budget_optimizer: str = ""

    def build(self, table: LogicalTable) -> "AutoSrhMethod":
        check_int(table.name, "groups", self.groups, 1)
        if self.groups > MAX_GROUPS:
            raise ValueError(f"table {table.name!r}: groups must be <= {MAX_GROUPS}, got {self.groups}")
        if not self.alpha_lr > 0 or self.l1 < 0:
            raise ValueError(
                f"table {table.name!r}: expected alpha_lr > 0 and l1 >= 0, got alpha_lr={self.alpha_lr}, l1={self.l1}"
            )
        return AutoSrhMethod(table, self)

    def floor_method(self) -> MethodSpec:
        """The smallest export the budget solver checks against: no row kept, four columns."""
        return PrunedTable(kept=0, width=4)


class AutoSrhMethod(MaskedMethod):
    pooling_commutes = False
    combine_uses_ids = True

    def __init__(self, table: LogicalTable, spec: AutoSrh) -> None:
        super().__init__(table)
        self.groups = spec.groups
        self.physical_tables = (PhysicalTable(table.name, table.cardinality, table.dim),)
        self.alpha = nn.Parameter(torch.ones(spec.groups, table.dim))
        if self.alpha.device.type != "meta":
            apply_optimizer_in_backward(NormalizedClippedSGD, [self.alpha], {"lr": spec.alpha_lr, "l1": spec.l1})
        self.register_buffer("group", torch.zeros(table.cardinality, dtype=torch.int8))
        self.register_buffer("shift", torch.tensor(0.0), persistent=False)

    def set_groups(self, counts: torch.Tensor) -> None:
        """Group the ids by their training `counts` ``[n]`` (`frequency_groups`)."""
        if counts.shape != (self.table.cardinality,):
            raise ValueError(
                f"table {self.table.name!r}: counts of shape {tuple(counts.shape)}; expected ({self.table.cardinality},)"
            )
        self.group.copy_(frequency_groups(counts.to(torch.int64), self.groups).to(torch.int8))

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.unsqueeze(0)

    def weights_of(self, ids: torch.Tensor) -> torch.Tensor:
        """``alpha[group(id)]`` ``[..., d]`` (padded slots, id -1, read group 0)."""
        return self.alpha[self.group[ids.clamp(min=0)].to(torch.int64)]

    def margins(self, rows: torch.Tensor) -> torch.Tensor:
        """``|e * alpha|`` of the full table's rows ``[n, d]`` (the export's pruning scores)."""
        ids = torch.arange(rows.shape[0], device=rows.device)
        return (rows * self.weights_of(ids)).abs()

    @torch.no_grad()
    def scores(self, weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) scores: the largest ``|e * alpha|`` of each row and of each column."""
        margin = self.margins(weights[0])
        return margin.amax(-1), margin.amax(0)

    def combine(self, vectors: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        scaled = vectors[0] * self.weights_of(ids)
        return scaled * (scaled.abs() > self.shift)
