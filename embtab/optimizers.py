"""What each fused sparse optimizer is: one description per kind, like FBGEMM's `EmbOptimType`.

A description knows its optimizer class (what `apply_optimizer_in_backward` is given, which
torchrec maps to the fbgemm kernel), the state tensors fbgemm keeps per physical table and their
size, and whether fbgemm's CPU build fuses it. Memory accounting, fusing, offload stores and
checkpoints all ask this table instead of keeping their own list of kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torchrec.optim import RowWiseAdagrad


@dataclass(frozen=True)
class StateTensor:
    """One state tensor fbgemm keeps for a table: `name` as in the fused optimizer's state, and
    whether it holds one float per row or one per element (``rows x dim``)."""

    name: str
    per: Literal["row", "element"]

    def floats_per_row(self, dim: int) -> int:
        return 1 if self.per == "row" else dim


@dataclass(frozen=True)
class OptimizerKind:
    """One sparse optimizer kind fbgemm fuses into the lookup's backward pass."""

    name: str
    torch_class: type[torch.optim.Optimizer]
    states: tuple[StateTensor, ...]
    fused_on_cpu: bool
    takes_eps: bool = True

    def state_floats_per_row(self, dim: int) -> int:
        """Floats of state per row of a `dim`-wide table (summed over the state tensors)."""
        return sum(state.floats_per_row(dim) for state in self.states)

    def state_bytes(self, rows: int, dim: int) -> int:
        """Bytes of state fbgemm allocates for a `rows` x `dim` table (float32 state)."""
        return rows * self.state_floats_per_row(dim) * 4


OPTIMIZER_KINDS: dict[str, OptimizerKind] = {
    kind.name: kind
    for kind in (
        OptimizerKind("sgd", torch.optim.SGD, (), fused_on_cpu=True, takes_eps=False),
        OptimizerKind("adagrad", torch.optim.Adagrad, (StateTensor("momentum1", "element"),), fused_on_cpu=True),
        OptimizerKind("rowwise_adagrad", RowWiseAdagrad, (StateTensor("momentum1", "row"),), fused_on_cpu=True),
        OptimizerKind(
            "adam",
            torch.optim.Adam,
            (StateTensor("momentum1", "element"), StateTensor("momentum2", "element")),
            fused_on_cpu=False,
        ),
    )
}
CPU_KINDS: tuple[str, ...] = tuple(name for name, kind in OPTIMIZER_KINDS.items() if kind.fused_on_cpu)


def optimizer_kind(name: str) -> OptimizerKind:
    """The description of sparse optimizer `name`; a clear error for a kind fbgemm does not fuse."""
    if name not in OPTIMIZER_KINDS:
        raise ValueError(
            f"sparse optimizer {name!r} is not fused by fbgemm; expected one of {tuple(OPTIMIZER_KINDS)}"
        )
    return OPTIMIZER_KINDS[name]


def state_width_of(name: str | None, dim: int) -> int:
    """Optimizer floats per row fbgemm keeps for optimizer kind `name` (None: no optimizer)."""
    return 0 if name is None else optimizer_kind(name).state_floats_per_row(dim)
