"""The row cache: C slots of a physical table of the fused collection, filled from a backing store.

The cache's slots are the rows of an ordinary physical table (``cache_rows x dim``) of the fused
torchrec collection, so fbgemm's kernels and its fused optimizer run on them unchanged. `RowCache`
writes rows into that table (and their optimizer state into the fused optimizer's state) in place,
through views of the fbgemm module's storage, and keeps the bookkeeping on the CPU. Tables that
share the cache form one row space (row = the table's offset + id, see `ConcatStore`):

- ``slot_map[row]``: the slot holding `row`, or -1 (the method's remap reads it);
- ``slot_row[slot]``: the row a slot holds, or -1 (free; free slots are kept on a stack);
- ``last_use[slot]``: the last batch (in loader order) that needs the slot; a slot is evictable
  only once that batch's training step has finished (``last_use <= done``);
- ``dirty[slot]``: the slot was (or will be) trained since it was loaded: write it back on eviction.

Missing rows go into free slots; when too few are free, the policy scores every slot once and
frees ``reclaim`` of them (never one a batch in flight needs), writing the dirty ones back.

Each row has exactly one authoritative copy: the cached one while it is cached, the store's
otherwise. Evicted dirty rows are written back before any row is read, in the same thread and
under the same lock, so a row is never read from the store while a newer copy is cached or on its
way back. Optimizer state travels with its row.

Devices: bookkeeping stays on the CPU; when the cache lives on a GPU, rows move between the
(pinned) store and the cache on a side stream that first waits for the training step that last
used the evicted slots, and the slot map is mirrored on the GPU. That path is written
device-generic but is untested here (no GPU on the development machine).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from embtab.offload.policy import EvictionPolicy
from embtab.offload.store import ConcatStore


@dataclass
class CacheStats:
    """Counters of one cache since it was attached: ids looked up (repeats count, as in a
    per-access hit rate), ids whose row was cached before its batch was admitted, rows moved."""

    batches: int = 0
    lookups: int = 0
    hits: int = 0
    loaded_rows: int = 0
    written_rows: int = 0
    row_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def bytes_moved(self) -> int:
        return (self.loaded_rows + self.written_rows) * self.row_bytes


@dataclass(frozen=True)
class Admission:
    """What admitting one batch's rows will do, computed without changing the cache."""

    ids: torch.Tensor
    slots: torch.Tensor
    hit: torch.Tensor
    missing: torch.Tensor
    evict: torch.Tensor


class _Mover:
    """Row copies between the host store and the cache: direct on the CPU, a side stream on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.step_done: torch.cuda.Event | None = None

    def to_host(self, source: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if self.stream is None:
            return source.index_select(0, slots)
        with torch.cuda.stream(self.stream):
            if self.step_done is not None:
                self.stream.wait_event(self.step_done)
            rows = source.index_select(0, slots.to(self.device, non_blocking=True))
            host = rows.to("cpu", non_blocking=True)
        self.stream.synchronize()
        return host

    def to_device(self, target: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        if self.stream is None:
            target.index_copy_(0, slots, values)
            return
        with torch.cuda.stream(self.stream):
            target.index_copy_(0, slots.to(self.device, non_blocking=True), values.pin_memory().to(self.device, non_blocking=True))

    def finish(self) -> None:
        """Wait until every copy issued so far has landed (before a batch is handed over)."""
        if self.stream is not None:
            self.stream.synchronize()


class RowCache:
    """`weights` (``[C, dim]``) and `state` (``[C, s]``) of the fused table as a cache over `store`.

    Args:
        name: the cache's physical table name.
        tables: the logical tables that share it, and their features (for messages).
        store: the tables' stores, as one row space.
        weights: a view of the fused cache table's weights (written in place).
        state: a view of its fused optimizer state, ``[C, store.state_width]``.
        policy: the eviction policy.
        reclaim: slots freed at once when the cache is full (at least the batch's missing rows).
    """

    def __init__(
        self,
        name: str,
        tables: dict[str, list[str]],
        store: ConcatStore,
        weights: torch.Tensor,
        state: torch.Tensor,
        policy: EvictionPolicy,
        reclaim: int = 1,
    ) -> None:
        self.name, self.tables, self.store, self.policy = name, tables, store, policy
        # `.data`: the fused forward saves the table for its backward; writes into other slots
        # while a step is in flight must not bump the autograd version counter it checks.
        self.weights, self.state = weights.data, state.data
        self.slots = int(weights.shape[0])
        self.slot_map = torch.full((store.rows,), -1, dtype=torch.int32)
        self.device_slot_map = self.slot_map if weights.device.type == "cpu" else self.slot_map.to(weights.device)
        self.slot_row = torch.full((self.slots,), -1, dtype=torch.int64)
        self.last_use = torch.full((self.slots,), -1, dtype=torch.int64)
        self.dirty = torch.zeros(self.slots, dtype=torch.bool)
        self.free_slots = torch.arange(self.slots - 1, -1, -1)
        self.free_count = self.slots
        self.reclaim = reclaim
        self.done = -1
        self.lock = threading.RLock()
        self.mover = _Mover(weights.device)
        self.stats = CacheStats(row_bytes=store.row_bytes)

    def slots_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Cache slots of logical `rows` (int64, same device as `rows`); every row must be cached."""
        slots = self.device_slot_map[rows]
        if rows.numel() and int(slots.min()) < 0:
            table, missing = self.store.locate(int(rows[slots < 0][0]))
            raise RuntimeError(
                f"offloaded table {table!r}: id {missing} is not in the cache {self.name!r}; expected "
                "every batch to come through embtab.offload.Prefetcher, which loads its rows first"
            )
        return slots.to(torch.int64)

    def plan(self, ids: torch.Tensor, step: int, window: Sequence[torch.Tensor]) -> Admission | None:
        """How batch `step` (its ids, repeats allowed) gets cached, or None while too few slots
        can be freed (batches in flight hold them). Pins the batch's cached rows (``last_use``);
        changes nothing else. When the free slots run short, the policy frees ``reclaim`` slots
        (or as many as are missing) at once, so its O(cache_rows) scoring runs once per many
        batches rather than per batch."""
        slots = self.slot_map.index_select(0, ids).to(torch.int64)
        hit = slots >= 0
        self.last_use.index_fill_(0, slots[hit], step)
        missing = self._distinct(ids[~hit])
        short = missing.numel() - self.free_count
        if short <= 0:
            return Admission(ids, slots, hit, missing, missing[:0])
        self._check_fits(ids, hit, missing, step)
        evictable = (self.last_use <= self.done) & (self.slot_row >= 0)
        available = int(evictable.sum())
        if available < short:
            return None
        count = min(available, max(short, self.reclaim))
        scores = self.policy.scores(self.slot_row, self.slot_map, step, window, evictable, count)
        scores = scores.masked_fill(~evictable, torch.iinfo(scores.dtype).min)
        return Admission(ids, slots, hit, missing, torch.topk(scores, count, sorted=False).indices)

    def _distinct(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (none of them cached) without repeats, without sorting: each row's slot-map entry
        briefly holds a mark, and the occurrence whose mark survived is kept. Uncached rows belong
        to no batch in flight, so the forward never reads these entries."""
        if rows.numel() == 0:
            return rows
        marks = -2 - torch.arange(rows.numel(), dtype=torch.int32)
        self.slot_map.index_put_((rows,), marks)
        distinct = rows[self.slot_map.index_select(0, rows) == marks]
        self.slot_map.index_fill_(0, distinct, -1)
        return distinct

    def _check_fits(self, ids: torch.Tensor, hit: torch.Tensor, missing: torch.Tensor, step: int) -> None:
        if missing.numel() + int(hit.sum()) <= self.slots:  # repeats counted: surely fits
            return
        needed = missing.numel() + int(torch.unique(ids[hit]).numel())
        if needed > self.slots:
            features = [f for names in self.tables.values() for f in names]
            raise ValueError(
                f"offload cache {self.name!r} (tables {list(self.tables)}, features {features}): batch "
                f"{step} needs {needed} distinct rows but cache_rows is {self.slots}; expected "
                "cache_rows >= the distinct rows of one batch (raise cache_rows or lower the batch size)"
            )

    @torch.no_grad()
    def admit(self, plan: Admission, step: int, train: bool) -> None:
        """Carry `plan` out: write back and free the evicted rows, load the missing ones into
        free slots, pin the batch."""
        if plan.evict.numel():
            self._evict(plan.evict)
        if plan.missing.numel():
            self.free_count -= plan.missing.numel()
            self._load(plan.missing, self.free_slots[self.free_count : self.free_count + plan.missing.numel()].clone())
        slots = plan.slots
        if plan.missing.numel():
            missed = ~plan.hit
            slots = slots.masked_scatter(missed, self.slot_map.index_select(0, plan.ids[missed]).to(torch.int64))
        self.last_use.index_fill_(0, slots, step)
        self.policy.touch(slots, plan.ids, step)
        if train:
            self.dirty.index_fill_(0, slots, True)
        self.mover.finish()
        self.stats.batches += 1
        self.stats.lookups += plan.ids.numel()
        self.stats.hits += int(plan.hit.sum())

    def _evict(self, victims: torch.Tensor) -> None:
        """Write the dirty `victims` back, unmap their rows and push the slots on the free stack."""
        old = self.slot_row.index_select(0, victims)
        write = torch.nonzero(self.dirty.index_select(0, victims)).squeeze(1)
        if write.numel():
            slots = victims.index_select(0, write)
            state = self.mover.to_host(self.state, slots) if self.store.state_width else self.state[:0]
            self.store.write(old.index_select(0, write), self.mover.to_host(self.weights, slots), state)
            self.stats.written_rows += write.numel()
        self.slot_map.index_fill_(0, old, -1)
        if self.device_slot_map is not self.slot_map:
            self.device_slot_map.index_fill_(0, old.to(self.device_slot_map.device), -1)
        self.slot_row.index_fill_(0, victims, -1)
        self.dirty.index_fill_(0, victims, False)
        self.free_slots[self.free_count : self.free_count + victims.numel()] = victims
        self.free_count += victims.numel()

    def _load(self, rows: torch.Tensor, victims: torch.Tensor) -> None:
        weights, state = self.store.read(rows)
        self.mover.to_device(self.weights, victims, weights)
        if self.store.state_width:
            self.mover.to_device(self.state, victims, state)
        self.slot_map.index_copy_(0, rows, victims.to(torch.int32))
        if self.device_slot_map is not self.slot_map:
            device = self.device_slot_map.device
            self.device_slot_map.index_copy_(0, rows.to(device), victims.to(device, torch.int32))
        self.slot_row.index_copy_(0, victims, rows)
        self.stats.loaded_rows += rows.numel()

    @torch.no_grad()
    def flush(self) -> None:
        """Write every dirty cached row back to the store and make the store durable.

        Call it between training steps (checkpoints, evaluation, the end of training). Rows stay
        cached; slots that a batch in flight will still train stay marked dirty.
        """
        with self.lock:
            write = self.dirty & (self.slot_row >= 0)
            if bool(write.any()):
                slots = torch.nonzero(write).squeeze(1)
                state = self.mover.to_host(self.state, slots) if self.store.state_width else self.state[:0]
                self.store.write(self.slot_row[slots], self.mover.to_host(self.weights, slots), state)
                self.stats.written_rows += slots.numel()
            self.dirty &= self.last_use > self.done
            self.store.flush()
