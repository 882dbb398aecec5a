"""AutoDim: per-field width search by a Gumbel-softmax mixture of candidate widths (Zhao et al.,
WWW 2021, "AutoDim: Field-aware Embedding Dimension Search in Recommender Systems"), as the VLDB
2024 benchmark runs it.

Search: each table holds one physical table per candidate width ``w_c`` (``n x w_c``); an id's
candidate vectors are projected to the model's width ``d`` (a linear layer with bias per candidate
and table), batch-normalized (no affine part), and mixed by the table's weights

    p = softmax((log_softmax(alpha) + G) / tau),    G ~ Gumbel(0, 1) per step (none in eval mode)
    e(x) = sum_c p_c * BN(W_c v_c(x) + b_c)

with the temperature annealed per training step ``t`` as in the benchmark,
``tau(t) = max(0.01, 1 - temperature_decay * t)``. ``alpha`` (one logit per candidate, starting
equal) learns on its own Adam at ``alpha_lr`` inside the backward pass.

Result: each table's width is its candidate of largest ``alpha`` ("autodim (learned)"), or, under
a byte budget, the widths of largest total log-probability that fit it (`fit_widths`: narrowing
first the tables whose preference costs least per byte saved); the tables are then retrained from
scratch as an MDE-like mixed-width table (``n x w`` and a bias-free projection to ``d``,
`retrain_method`). Widths are multiples of 4 (the fused kernels need it): the candidates double
from 4 to ``d`` (the benchmark's {2, 4, 8, 16} at d = 16 without the 2), so the smallest export
is every table at width 4 with its projection: at ``d = 16`` with row-wise Adagrad state that is
``(4 * 4 + 4) / (16 * 4 + 4)``, about 0.29 of the full bytes; budgets below that are refused
(`embtab.budget.BelowMinimum`, naming that floor).

Differences from the benchmark (Hetu ``AutoDimEmbedding``): ``alpha`` learns on the training
batches jointly with the model (Hetu: a DARTS-style second-order step on validation batches, or
first-order on validation batches), starts at zero instead of a random draw, and on Adam instead
of SGD; the retrained table's projection has no bias (so pooling commutes); Hetu ignores the
budget, here a budget picks the widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from embtab.config import LogicalTable, MethodSpec
from embtab.methods.base import LearnedSizeSpec, PhysicalTable, TableMethod
from embtab.methods.mde import MDE
from embtab.registry import MethodKind, register_method


def default_candidates(dim: int) -> tuple[int, ...]:
    """4, 8, 16, ... doubling below `dim`, then `dim` itself."""
    widths = [4]
    while widths[-1] * 2 < dim:
        widths.append(widths[-1] * 2)
    return tuple(w for w in widths if w < dim) + (dim,)


@register_method(MethodKind.LEARNED_SIZE)
@dataclass(frozen=True)
class AutoDim(LearnedSizeSpec):
    """Candidate widths per table, mixed by learned Gumbel-softmax weights; the chosen width retrains.

    Args:
        candidates: the candidate widths (multiples of 4, ascending, at most the table's width);
            empty: 4, 8, ... doubling up to the width.
        alpha_lr: Adam learning rate of the mixture logits.
        temperature_decay: per training step, ``tau = max(0.01, 1 - temperature_decay * t)``
            (the benchmark: 5e-5 / 2000 * batch size, 2.56e-5 at batch 1024).
        batch_norm: normalize each candidate's projected vectors over the batch (the benchmark's).
        budget_bytes: bytes the retrained tables must fit (0: the learned widths).
        budget_optimizer: the sparse optimizer whose state the budget counts ("" for weights only).
    """

    name = "autodim"

    candidates: tuple[int, ...] = ()
    alpha_lr: float = 1e-3
    temperature_decay: float = 2.56e-5
    batch_norm: bool = True
    budget_bytes: int = 0
    budget_optimizer: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))

    def widths(self, dim: int) -> tuple[int, ...]:
        return self.candidates or default_candidates(dim)

    def build(self, table: LogicalTable) -> "AutoDimMethod":
        widths = self.widths(table.dim)
        bad = [w for w in widths if isinstance(w, bool) or not isinstance(w, int) or w < 4 or w % 4 or w > table.dim]
        if bad or list(widths) != sorted(set(widths)):
            raise ValueError(
                f"table {table.name!r}: candidates must be ascending distinct multiples of 4 in [4, {table.dim}], "
                f"got {widths!r}"
            )
        if not self.alpha_lr > 0 or self.temperature_decay < 0:
            raise ValueError(
                f"table {table.name!r}: expected alpha_lr > 0 and temperature_decay >= 0, "
                f"got alpha_lr={self.alpha_lr}, temperature_decay={self.temperature_decay}"
            )
        return AutoDimMethod(table, self, widths)

    floor_description: ClassVar[str] = "every table at its narrowest candidate width"

    def floor_method(self) -> MethodSpec:
        """The smallest result: every table at the narrowest width (4) with its projection."""
        return retrain_method(min(self.candidates or (4,)))


def retrain_method(width: int) -> MDE:
    """The retraining architecture of a table searched to `width`: ``n x width`` and a bias-free
    projection to the model's width (none at full width)."""
    return MDE(base_dim=width, alpha=0.0)


def temperature(step: int, decay: float) -> float:
    """The benchmark's annealed temperature after `step` training steps."""
    return max(0.01, 1.0 - decay * step)


class AutoDimMethod(TableMethod):
    pooling_commutes = False

    def __init__(self, table: LogicalTable, spec: AutoDim, widths: tuple[int, ...]) -> None:
        super().__init__(table)
        self.widths = widths
        self.decay = spec.temperature_decay
        self.physical_tables = tuple(PhysicalTable(f"{table.name}@w{w}", table.cardinality, w) for w in widths)
        self.projections = nn.ModuleList(nn.Linear(w, table.dim) for w in widths)
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(table.dim, affine=False) if spec.batch_norm else nn.Identity() for _ in widths
        )
        self.alpha = nn.Parameter(torch.zeros(len(widths)))
        if self.alpha.device.type != "meta":
            apply_optimizer_in_backward(torch.optim.Adam, [self.alpha], {"lr": spec.alpha_lr})
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.unsqueeze(0).expand(len(self.widths), -1)

    def mixture(self) -> torch.Tensor:
        """The candidates' weights ``p`` for this step (Gumbel noise and a step count in training)."""
        logits = torch.log_softmax(self.alpha, 0)
        if self.training:
            with torch.no_grad():
                self.step += 1
            uniform = torch.rand_like(logits).clamp(1e-10, 1.0)
            logits = logits - torch.log(-torch.log(uniform))
        return torch.softmax(logits / temperature(int(self.step), self.decay), 0)

    def candidate_vectors(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each candidate's ``BN(W_c v_c + b_c)`` ``[..., d]``."""
        out = []
        for v, projection, norm in zip(vectors, self.projections, self.norms):  # a few candidates
            projected = projection(v).reshape(-1, self.table.dim)
            out.append(norm(projected).reshape(*v.shape[:-1], self.table.dim))
        return out

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(self.candidate_vectors(vectors), -1)
        return stacked @ self.mixture()

    def chosen_width(self) -> int:
        """The candidate of largest ``alpha`` (the learned result)."""
        return self.widths[int(self.alpha.detach().argmax())]


def fit_widths(
    preferences: Mapping[str, tuple[tuple[int, ...], torch.Tensor]],
    cost: Callable[[str, int], int],
    budget: int,
) -> dict[str, int]:
    """Per table, the width of largest total log-probability whose retrained tables fit `budget`.

    `preferences` gives each table's candidate widths and logits, `cost(table, width)` the bytes
    of that table retrained at that width. From every table's most likely
    width, the step that loses the least log-probability per byte saved (a table to its next
    narrower candidate that is cheaper) is taken until the bytes fit.

    Raises:
        ValueError: even every table at its narrowest candidate exceeds the budget.
    """
    chosen, logp = {}, {}
    for name, (widths, logits) in preferences.items():
        logp[name] = torch.log_softmax(logits.detach().double(), 0).tolist()
        chosen[name] = int(torch.tensor(logp[name]).argmax())
    total = sum(cost(n, preferences[n][0][c]) for n, c in chosen.items())
    while total > budget:
        best, best_rate = None, math.inf
        for name, c in chosen.items():  # one step per table considered: tables, not ids
            widths = preferences[name][0]
            narrower = [k for k in range(c) if cost(name, widths[k]) < cost(name, widths[c])]
            if not narrower:
                continue
            k = max(narrower, key=lambda i: logp[name][i])
            saved = cost(name, widths[c]) - cost(name, widths[k])
            rate = (logp[name][c] - logp[name][k]) / saved
            if rate < best_rate:
                best, best_rate = (name, k), rate
        if best is None:
            raise ValueError(
                f"budget {budget} bytes is below the narrowest widths' {total} bytes; expected a budget >= {total}"
            )
        name, k = best
        total += cost(name, preferences[name][0][k]) - cost(name, preferences[name][0][chosen[name]])
        chosen[name] = k
    return {name: preferences[name][0][c] for name, c in chosen.items()}
