"""Eviction policies of the row cache, vectorized per batch.

A policy scores every cache slot once per admitted batch (higher: evict first); the cache masks
out the slots a batch in flight needs and takes the top-k scores as victims. No per-id heaps:
each policy keeps one small tensor (per slot or per row) and updates it with one indexed write
per batch.

- ``lru``: evict the slot whose row was used longest ago.
- ``lfu``: evict the row looked up the fewest times since training began (counts per row survive
  eviction, as in FBGEMM's LFU cache), ties broken by LRU.
- ``lookahead``: Bagpipe's oracle cacher (Agarwal et al., SOSP 2023): the prefetcher knows the ids of
  the next batches; evict rows not used in that window first (least recently used among them),
  then the row whose next use is furthest away.
"""

from __future__ import annotations

from typing import Sequence

import torch

from embtab.methods.offloaded import POLICIES


class EvictionPolicy:
    """Base: keeps the last batch that used each slot (every policy breaks ties by recency)."""

    def __init__(self, slots: int, rows: int) -> None:
        self.last_access = torch.full((slots,), -1, dtype=torch.int64)

    def touch(self, slots: torch.Tensor, rows: torch.Tensor, step: int) -> None:
        """Record that batch `step` uses `rows`, held in `slots`."""
        self.last_access.index_fill_(0, slots, step)

    def enter(self, ids: torch.Tensor) -> None:
        """A batch with `ids` joined the look-ahead window (read ahead, not yet admitted)."""

    def leave(self, ids: torch.Tensor) -> None:
        """A batch with `ids` left the window (it is being admitted)."""

    def scores(
        self,
        slot_row: torch.Tensor,
        slot_map: torch.Tensor,
        step: int,
        window: Sequence[torch.Tensor],
        evictable: torch.Tensor,
        needed: int,
    ) -> torch.Tensor:
        """int64 ``[slots]`` eviction scores, higher first, for batch `step` that needs `needed`
        of the `evictable` slots; `window` holds the ids of the batches after it, nearest first."""
        raise NotImplementedError


class LRU(EvictionPolicy):
    def scores(self, slot_row, slot_map, step, window, evictable, needed):
        return step - self.last_access


class LFU(EvictionPolicy):
    def __init__(self, slots: int, rows: int) -> None:
        super().__init__(slots, rows)
        self.counts = torch.zeros(rows, dtype=torch.int32)

    def touch(self, slots, rows, step):
        super().touch(slots, rows, step)
        self.counts.index_put_((rows,), torch.ones_like(rows, dtype=torch.int32), accumulate=True)

    def scores(self, slot_row, slot_map, step, window, evictable, needed):
        counts = self.counts.index_select(0, slot_row.clamp(min=0)).to(torch.int64)
        return (step - self.last_access) - counts * (step + 2)


class LookAhead(EvictionPolicy):
    """Counts each row's ids in the window (one scatter per batch entering or leaving it), so
    "not used in the window" is one gather; exact next-use distances are computed only when the
    rows outside the window cannot free enough slots."""

    def __init__(self, slots: int, rows: int) -> None:
        super().__init__(slots, rows)
        self.in_window = torch.zeros(rows, dtype=torch.int32)

    def enter(self, ids):
        self.in_window.index_put_((ids,), torch.ones_like(ids, dtype=torch.int32), accumulate=True)

    def leave(self, ids):
        self.in_window.index_put_((ids,), torch.full_like(ids, -1, dtype=torch.int32), accumulate=True)

    def scores(self, slot_row, slot_map, step, window, evictable, needed):
        beyond = len(window) + 1
        wanted = self.in_window.index_select(0, slot_row.clamp(min=0)) > 0
        outside = beyond + step - self.last_access
        if int((evictable & ~wanted).sum()) >= needed:
            return outside.masked_fill_(wanted, 0)
        return torch.where(wanted, self._next_use(slot_map, window), outside)

    def _next_use(self, slot_map: torch.Tensor, window: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per slot, how many batches ahead its row is next used (``len(window) + 1``: never)."""
        beyond = len(window) + 1
        next_use = torch.full_like(self.last_access, beyond)
        rows = torch.cat(list(window))
        distance = torch.repeat_interleave(torch.arange(1, beyond), torch.tensor([w.numel() for w in window]))
        used = slot_map.index_select(0, rows).to(torch.int64)
        cached = used >= 0
        return next_use.scatter_reduce_(0, used[cached], distance[cached], "amin")


def make_policy(name: str, slots: int, rows: int, table: str = "") -> EvictionPolicy:
    """The policy called `name` for a cache of `slots` slots over `rows` rows."""
    classes = {"lru": LRU, "lfu": LFU, "lookahead": LookAhead}
    if name not in classes:
        raise ValueError(f"offloaded table {table!r}: unknown eviction policy {name!r}; expected one of {POLICIES}")
    return classes[name](slots, rows)
