"""DeepLight: gradual magnitude pruning of the table while it trains (Deng et al., WSDM 2021,
"DeepLight: Deep Lightweight Feature Interactions for Accelerating CTR Predictions in Ad Serving").

The table trains as a full table; every ``prune_every`` training steps after ``warmup_steps``, the
elements of smallest magnitude are set to zero until the table's share of zeros reaches

    s(t) = sparsity * (1 - damping ** (t / damping_steps)),     t = steps after the warm-up

(the paper's and the VLDB benchmark's schedule: ``damping = 0.99``, ``damping_steps = 100``,
pruning every 10 steps, optimizer state kept). A pruned element stays pruned: `combine` multiplies
every looked-up element by ``(|v| > shift)``, so a zero gets no gradient and the fused optimizers
(SGD, Adagrad, row-wise Adagrad) leave it at zero (the mask of gradual pruning, Zhu & Gupta 2017).
The pruning happens in `remap`, before the step's lookup, on the fused table itself (the method
is bound after fusing); a sharded table's threshold is taken over all of its shards.

``sparsity`` is the share of the table's elements pruned at the end; `csr_sparsity`
(`embtab.search.sparse`) gives the one whose CSR export fits a byte budget. After training, the
search stage (`experiments.search.run_deeplight`) prunes to exactly that budget (`shift`, as
PEP's export), exports the element-sparse table as CSR and charges it that storage.

Differences from the benchmark (Hetu ``DeepLightEmbedding``): pruned elements stay zero (Hetu
zeroes the smallest magnitudes at each pruning step, so an element pruned earlier may regrow in
between), and the extra pruning at each epoch's end is not done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from embtab.config import LogicalTable, MethodSpec
from embtab.methods.base import BoundAfterFusing, LearnedSizeSpec, MaskedMethod, PhysicalTable
from embtab.checks import check_int
from embtab.methods.pruned import PrunedTable
from embtab.registry import MethodKind, register_method

if TYPE_CHECKING:
    from embtab.fused_state import StoredTable, FusedTables


@register_method(MethodKind.LEARNED_SIZE)
@dataclass(frozen=True)
class DeepLight(LearnedSizeSpec):
    """A full table pruned by magnitude while it trains, towards a target share of zeros.

    Args:
        sparsity: share of the table's elements pruned at the end of the schedule, in [0, 1).
        warmup_steps: training steps before the first pruning.
        prune_every: prune every this many steps after the warm-up.
        damping: the schedule's base (``s(t) = sparsity * (1 - damping ** (t / damping_steps))``).
        damping_steps: the schedule's time scale in steps (a float: small data has few steps).
        budget_bytes: bytes the CSR export must fit (0: prune to ``sparsity`` only).
        budget_optimizer: the sparse optimizer whose state the budget counts ("" for weights only).
    """

    name = "deeplight"

    sparsity: float = 0.0
    warmup_steps: int = 0
    prune_every: int = 10
    damping: float = 0.99
    damping_steps: float = 100.0
    budget_bytes: int = 0
    budget_optimizer: str = ""

    def build(self, table: LogicalTable) -> "DeepLightMethod":
        self.check(table.name)
        return DeepLightMethod(table, self)

    def check(self, table: str) -> None:
        """Raise a ValueError naming `table`, the field and its value for a bad parameter."""
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"table {table!r}: sparsity must be in [0, 1), got {self.sparsity!r}")
        check_int(table, "warmup_steps", self.warmup_steps, 0)
        check_int(table, "prune_every", self.prune_every, 1)
        if not 0.0 < self.damping < 1.0:
            raise ValueError(f"table {table!r}: damping must be in (0, 1), got {self.damping!r}")
        if not self.damping_steps > 0:
            raise ValueError(f"table {table!r}: damping_steps must be > 0, got {self.damping_steps!r}")

    def schedule(self, step: int) -> float:
        """Target share of zeros after training step `step` (1-based); 0 during the warm-up."""
        after = step - self.warmup_steps
        if after <= 0:
            return 0.0
        return self.sparsity * (1.0 - self.damping ** (after / self.damping_steps))

    def prunes_at(self, step: int) -> bool:
        """Whether training step `step` (1-based) prunes before its lookup."""
        after = step - self.warmup_steps
        return after > 0 and after % self.prune_every == 0

    def floor_method(self) -> MethodSpec:
        """The smallest export the budget solver checks against: no row kept, four columns."""
        return PrunedTable(kept=0, width=4)


class DeepLightMethod(BoundAfterFusing, MaskedMethod):
    pooling_commutes = False

    def __init__(self, table: LogicalTable, spec: DeepLight) -> None:
        super().__init__(table)
        self.spec = spec
        self.physical_tables = (PhysicalTable(table.name, table.cardinality, table.dim),)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("shift", torch.tensor(0.0), persistent=False)
        self.stored: "StoredTable | None" = None
        self.process_group: dist.ProcessGroup | None = None

    def bind_fused(self, fused: "FusedTables") -> None:
        """Hold the stored table (its weight views) and the ranks it is sharded over."""
        self.stored = fused.table(self.physical_tables[0].name)
        self.process_group = fused.process_group

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.advance()
        return ids.unsqueeze(0)

    @torch.no_grad()
    def advance(self) -> None:
        """Count one training step; prune the table to the schedule's sparsity when it is due."""
        self.step += 1
        step = int(self.step)
        if self.spec.prunes_at(step):
            self.prune_to(self.spec.schedule(step))

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Zero the ``floor(sparsity * n * d)`` elements of smallest magnitude (ties at the
        threshold included) in the stored table, on every shard."""
        if self.stored is None:
            raise RuntimeError(
                f"table {self.table.name!r}: DeepLight prunes the fused table, which is not bound; "
                "train it under embtab.fuse (or bind it with embtab.fused_state.attach_row_reset)"
            )
        count = int(sparsity * self.table.cardinality * self.table.dim)
        if count == 0:
            return
        shards = [s.tensor for s in self.stored.weight_shards()]
        local = torch.cat([torch.zeros(0)] + [s.detach().abs().reshape(-1).float() for s in shards])
        magnitudes = self._all_magnitudes(local)
        threshold = torch.kthvalue(magnitudes, count).values
        for shard in shards:  # this rank's shards of one table (at most a few)
            shard.masked_fill_(shard.abs() <= threshold, 0.0)

    def _all_magnitudes(self, local: torch.Tensor) -> torch.Tensor:
        """Magnitudes of the whole table: the local ones where this rank holds all of it (one
        process, or a data-parallel replica), else every rank's shards gathered."""
        group = self.process_group
        if group is None or not isinstance(self.stored.weight, ShardedTensor):  # type: ignore[union-attr]
            return local
        world = dist.get_world_size(group)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([local.numel()]), group=group)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=local.dtype)
        padded[: local.numel()] = local
        gathered = [torch.empty(longest, dtype=local.dtype) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])

    @torch.no_grad()
    def scores(self, weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) scores: the largest magnitude of each row and of each column."""
        magnitude = weights[0].abs()
        return magnitude.amax(-1), magnitude.amax(0)

    def margins(self, rows: torch.Tensor) -> torch.Tensor:
        """The element margins a byte budget is fitted against (`embtab.search.sparse.csr_shift`)."""
        return rows.abs()

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        v = vectors[0]
        return v * (v.abs() > self.shift)
