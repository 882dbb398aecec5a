"""Eviction policies of the row cache, vectorized per batch.

A policy scores every cache slot once per admitted batch (higher: evict first); the cache masks
out the slots a batch in flight needs and takes the top-k scores as victims. No per-id heaps:
each policy keeps one small tensor (per slot or per row) and updates it with one indexed write
per batch.

- ``lru``: evict the slot whose row was used longest ago.
- ``lfu``: evict the row used the fewest times since training began (counts per row survive
  eviction, as in FBGEMM's LFU cache), ties broken by LRU.
- ``lookahead``: Bagpipe's oracle cacher (Agarwal et al., SOSP 2023): the prefetcher knows the ids of
  the next batches; evict rows not used in that window first (least recently used among them),
  then the row whose next use is furthest away.
"""

from __future__ import annotations

from typing import Sequence

import torch

POLICIES: tuple[str, ...] = ("lru", "lfu", "lookahead")


class EvictionPolicy:
    """Base: keeps the last batch that used each slot (every policy breaks ties by recency)."""

    def __init__(self, slots: int, rows: int) -> None:
        self.last_access = torch.full((slots,), -1, dtype=torch.int64)

    def touch(self, slots: torch.Tensor, rows: torch.Tensor, step: int) -> None:
        """Record that batch `step` uses `rows`, held in `slots`."""
        self.last_access[slots] = step

    def scores(
        self, slot_row: torch.Tensor, slot_map: torch.Tensor, step: int, window: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """float64 ``[slots]`` eviction scores, higher first; `window` holds the distinct rows of
        the batches after `step`, nearest first."""
        raise NotImplementedError


class LRU(EvictionPolicy):
    def scores(self, slot_row, slot_map, step, window):
        return (step - self.last_access).to(torch.float64)


class LFU(EvictionPolicy):
    def __init__(self, slots: int, rows: int) -> None:
        super().__init__(slots, rows)
        self.counts = torch.zeros(rows, dtype=torch.int32)

    def touch(self, slots, rows, step):
        super().touch(slots, rows, step)
        self.counts[rows] += 1

    def scores(self, slot_row, slot_map, step, window):
        counts = self.counts[slot_row.clamp(min=0)].to(torch.float64)
        age = (step - self.last_access).to(torch.float64)
        return age - counts * (step + 2)


class LookAhead(EvictionPolicy):
    def scores(self, slot_row, slot_map, step, window):
        slots = self.last_access.numel()
        next_use = torch.full((slots,), float("inf"), dtype=torch.float64)
        for distance in range(len(window), 0, -1):  # nearest batch written last: it wins
            used = slot_map[window[distance - 1]].to(torch.int64)
            next_use[used[used >= 0]] = float(distance)
        age = (step - self.last_access).to(torch.float64)
        return torch.where(next_use.isinf(), len(window) + 1 + age, next_use)


def make_policy(name: str, slots: int, rows: int, table: str = "") -> EvictionPolicy:
    """The policy called `name` for a cache of `slots` slots over `rows` rows."""
    classes = {"lru": LRU, "lfu": LFU, "lookahead": LookAhead}
    if name not in classes:
        raise ValueError(f"offloaded table {table!r}: unknown eviction policy {name!r}; expected one of {POLICIES}")
    return classes[name](slots, rows)
