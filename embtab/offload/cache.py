"""The row cache: C slots of a physical table of the fused collection, filled from a backing store.

The cache's slots are the rows of an ordinary physical table (``cache_rows x dim``) of the fused
torchrec collection, so fbgemm's kernels and its fused optimizer run on them unchanged. `RowCache`
writes rows into that table (and their optimizer state into the fused optimizer's state) in place,
through views of the fbgemm module's storage, and keeps the bookkeeping on the CPU:

- ``slot_map[row]``: the slot holding logical row `row`, or -1 (the method's remap reads it);
- ``slot_row[slot]``: the row a slot holds, or -1 (free);
- ``last_use[slot]``: the last batch (in loader order) that needs the slot; a slot is evictable
  only once that batch's training step has finished (``last_use <= done``);
- ``dirty[slot]``: the slot was (or will be) trained since it was loaded: write it back on eviction.

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
from embtab.offload.store import RowStore


@dataclass
class CacheStats:
    """Counters of one cache since it was attached (rows are distinct rows per batch)."""

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

    rows: torch.Tensor
    slots: torch.Tensor
    missing: torch.Tensor
    victims: torch.Tensor


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
        table: the logical table's name (for messages and statistics).
        features: the features that read the table (for messages).
        store: the backing store with the whole table.
        weights: a view of the fused cache table's weights (written in place).
        state: a view of its fused optimizer state, ``[C, store.state_width]``.
        policy: the eviction policy.
    """

    def __init__(
        self,
        table: str,
        features: Sequence[str],
        store: RowStore,
        weights: torch.Tensor,
        state: torch.Tensor,
        policy: EvictionPolicy,
    ) -> None:
        self.table, self.features, self.store, self.policy = table, tuple(features), store, policy
        # `.data`: the fused forward saves the table for its backward; writes into other slots
        # while a step is in flight must not bump the autograd version counter it checks.
        self.weights, self.state = weights.data, state.data
        self.slots = int(weights.shape[0])
        self.slot_map = torch.full((store.rows,), -1, dtype=torch.int32)
        self.device_slot_map = self.slot_map if weights.device.type == "cpu" else self.slot_map.to(weights.device)
        self.slot_row = torch.full((self.slots,), -1, dtype=torch.int64)
        self.last_use = torch.full((self.slots,), -1, dtype=torch.int64)
        self.dirty = torch.zeros(self.slots, dtype=torch.bool)
        self.done = -1
        self.lock = threading.RLock()
        self.mover = _Mover(weights.device)
        self.stats = CacheStats(row_bytes=store.row_bytes)

    def slots_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Cache slots of logical `rows` (int64, same device as `rows`); every row must be cached."""
        slots = self.device_slot_map[rows]
        if rows.numel() and int(slots.min()) < 0:
            missing = int(rows[slots < 0][0])
            raise RuntimeError(
                f"offloaded table {self.table!r}: row {missing} is not in the cache; expected every "
                "batch to come through embtab.offload.Prefetcher, which loads its rows first"
            )
        return slots.to(torch.int64)

    def plan(
        self, rows: torch.Tensor, step: int, window: Sequence[torch.Tensor]
    ) -> Admission | None:
        """How batch `step` (distinct `rows`) gets cached, or None while too few slots are free
        (batches in flight hold them). Changes nothing."""
        if rows.numel() > self.slots:
            raise ValueError(
                f"offloaded table {self.table!r} (features {list(self.features)}): batch {step} needs "
                f"{rows.numel()} distinct rows but cache_rows is {self.slots}; expected cache_rows >= "
                "the distinct rows of one batch (raise cache_rows or lower the batch size)"
            )
        slots = self.slot_map[rows].to(torch.int64)
        missing = rows[slots < 0]
        if missing.numel() == 0:
            return Admission(rows, slots, missing, missing)
        evictable = self.last_use <= self.done
        evictable[slots[slots >= 0]] = False
        if int(evictable.sum()) < missing.numel():
            return None
        scores = self.policy.scores(self.slot_row, self.slot_map, step, window)
        scores = scores.masked_fill(self.slot_row < 0, float("inf")).masked_fill(~evictable, float("-inf"))
        victims = torch.topk(scores, missing.numel(), sorted=False).indices
        return Admission(rows, slots, missing, victims)

    @torch.no_grad()
    def admit(self, plan: Admission, step: int, train: bool) -> None:
        """Carry `plan` out: write back evicted dirty rows, load the missing ones, pin the batch."""
        hit = plan.slots >= 0
        slots = plan.slots.clone()
        if plan.victims.numel():
            self._evict(plan.victims)
            self._load(plan.missing, plan.victims)
            slots[~hit] = plan.victims
        self.last_use[slots] = step
        self.policy.touch(slots, plan.rows, step)
        if train:
            self.dirty[slots] = True
        self.mover.finish()
        self.stats.batches += 1
        self.stats.lookups += plan.rows.numel()
        self.stats.hits += int(hit.sum())

    def _evict(self, victims: torch.Tensor) -> None:
        old = self.slot_row[victims]
        held = old >= 0
        write = held & self.dirty[victims]
        if bool(write.any()):
            slots = victims[write]
            state = self.mover.to_host(self.state, slots) if self.store.state_width else self.state[:0]
            self.store.write(old[write], self.mover.to_host(self.weights, slots), state)
            self.stats.written_rows += int(write.sum())
        self.slot_map[old[held]] = -1
        if self.device_slot_map is not self.slot_map:
            self.device_slot_map[old[held].to(self.device_slot_map.device)] = -1

    def _load(self, rows: torch.Tensor, victims: torch.Tensor) -> None:
        weights, state = self.store.read(rows)
        self.mover.to_device(self.weights, victims, weights)
        if self.store.state_width:
            self.mover.to_device(self.state, victims, state)
        self.slot_map[rows] = victims.to(torch.int32)
        if self.device_slot_map is not self.slot_map:
            device = self.device_slot_map.device
            self.device_slot_map[rows.to(device)] = victims.to(device, torch.int32)
        self.slot_row[victims] = rows
        self.dirty[victims] = False
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
