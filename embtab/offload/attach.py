"""Bind backing stores to a model's offloaded tables: `attach(model, stores) -> Offload`."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Mapping

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from embtab.fused_state import StoredTable, stored_tables_of, weight_keys, whole_local
from embtab.methods.offloaded import OffloadedMethod
from embtab.offload.cache import CacheStats, RowCache
from embtab.offload.policy import make_policy
from embtab.offload.store import ConcatStore, RowStore


class Offload:
    """The row caches of a model's offloaded tables, by cache (physical table) name.

    `clock` counts the batches admitted so far over every prefetcher (the caches' batch numbers);
    at most one `Prefetcher` drives the caches at a time.
    """

    def __init__(self, caches: dict[str, RowCache]) -> None:
        self.caches = caches
        self.clock = 0
        self.active = False
        self._keys: tuple[str, ...] = ()
        self._features: dict[str, list[int]] = {}

    def ids_of(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Per cache, the rows (table offset + id, repeats kept) that `kjt` reads (int64, CPU)."""
        keys = tuple(kjt.keys())
        if keys != self._keys:
            self._features = {name: self._positions(cache, keys) for name, cache in self.caches.items()}
            self._keys = keys
        bounds = [0, *torch.tensor(kjt.length_per_key()).cumsum(0).tolist()]
        values = kjt.values().to("cpu", torch.int64)
        return {
            name: torch.cat(
                [torch.empty(0, dtype=torch.int64)]
                + [_checked(values[bounds[i] : bounds[i + 1]], f, rows) + offset for i, f, offset, rows in positions]
            )
            for name, positions in self._features.items()
        }

    @staticmethod
    def _positions(cache: RowCache, keys: tuple[str, ...]) -> list[tuple[int, str, int, int]]:
        """(key position, feature, row offset, table rows) of every feature that reads `cache`."""
        store = cache.store
        offsets = dict(zip(store.names, store.offsets.tolist()))
        rows = dict(zip(store.names, (store.offsets[1:] - store.offsets[:-1]).tolist()))
        return [
            (keys.index(f), f, offsets[t], rows[t])
            for t, features in cache.tables.items()
            for f in features
            if f in keys
        ]

    def enter_window(self, ids: dict[str, torch.Tensor]) -> None:
        """A batch (its `ids_of`) was read ahead into the look-ahead window."""
        for name, cache in self.caches.items():
            cache.policy.enter(ids[name])

    def leave_window(self, ids: dict[str, torch.Tensor]) -> None:
        """A batch left the window: it is the next to be admitted."""
        for name, cache in self.caches.items():
            cache.policy.leave(ids[name])

    def locks(self) -> ExitStack:
        """Hold every cache's lock (in a fixed order) until the returned stack exits."""
        stack = ExitStack()
        for cache in self.caches.values():
            stack.enter_context(cache.lock)
        return stack

    def set_done(self, step: int) -> None:
        """Batches up to `step` have finished their training step: their slots may be evicted."""
        for cache in self.caches.values():
            cache.done = step

    def flush(self) -> None:
        """Write every dirty cached row back to its store (checkpoint, evaluation, end of training)."""
        for cache in self.caches.values():
            cache.flush()

    def stats(self) -> dict[str, CacheStats]:
        return {name: cache.stats for name, cache in self.caches.items()}


def _checked(ids: torch.Tensor, feature: str, rows: int) -> torch.Tensor:
    """`ids` of an offloaded `feature`, which must lie in ``[0, rows)``: checked before any row
    moves, so a bad id never loads a row (of this table or the next one in the cache)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
        bad = ids[(ids < 0) | (ids >= rows)][0]
        raise ValueError(f"feature {feature!r} (offloaded): id {int(bad)} is out of range; expected ids in [0, {rows})")
    return ids


def attach(model: nn.Module, stores: Mapping[str, RowStore]) -> Offload:
    """Give every offloaded table of `model` its store; returns the caches to prefetch with.

    Call it after `embtab.fuse` (on the `DistributedModelParallel`), so the caches write into the
    fused kernels' weights and fused optimizer state in place. `stores` maps each offloaded
    logical table to its store: cardinality rows of the table's width, with the fused
    optimizer's state per row.
    """
    keys = weight_keys(model)
    groups: dict[str, list[OffloadedMethod]] = {}
    stored: dict[str, StoredTable] = {}
    for tables, tables_stored in stored_tables_of(model):
        for method in tables.methods.values():
            if isinstance(method, OffloadedMethod):
                name = method.physical_tables[0].name
                groups.setdefault(name, []).append(method)
                stored[name] = tables_stored[name]
    missing = sorted(m.table.name for group in groups.values() for m in group if m.table.name not in stores)
    unused = sorted(set(stores) - {m.table.name for group in groups.values() for m in group})
    if missing or unused:
        raise ValueError(f"offloaded tables without a store: {missing}; stores for no offloaded table: {unused}")
    caches = {name: _cache(name, group, stores, stored[name], keys[name]) for name, group in groups.items()}
    return Offload(caches)


def _cache(
    name: str,
    members: list[OffloadedMethod],
    stores: Mapping[str, RowStore],
    stored: StoredTable,
    keys: list[str],
) -> RowCache:
    """One cache over the tables in `members`, which share the physical table `name` (`stored`;
    `keys`: every weight key of that name in the model, which must be one)."""
    specs = {m.spec for m in members}
    if len(specs) != 1:
        raise ValueError(f"offloaded tables {[m.table.name for m in members]} share cache {name!r} but differ: {specs}")
    spec, physical = specs.pop(), members[0].physical_tables[0]
    if len(keys) != 1:
        raise ValueError(f"offloaded table {name!r}: expected one fused weight, found {keys}")
    state = _optimizer_state(stored).view(physical.rows, -1)
    for method in members:
        stores[method.table.name].check_table(method.table.name, method.table.cardinality, physical.dim, int(state.shape[1]))
    store = ConcatStore([stores[m.table.name] for m in members], [m.table.name for m in members])
    policy = make_policy(spec.policy, physical.rows, store.rows, name)
    reclaim = max(1, int(spec.reclaim * physical.rows))
    tables = {m.table.name: [f.name for f in m.table.features] for m in members}
    weight = whole_local(stored.weight, "offloaded tables")
    cache = RowCache(name, tables, store, weight, state, policy, reclaim)
    for method, offset in zip(members, store.offsets.tolist()):
        method.bind_cache(cache, offset)
    return cache


def _optimizer_state(stored: StoredTable) -> torch.Tensor:
    """The fused optimizer's per-row state of the table (a view; no columns when unfused)."""
    tensors = [whole_local(v, "offloaded tables") for v in stored.states.values()]
    if len(tensors) > 1:
        raise ValueError(
            f"{stored.key!r}: offloading supports one optimizer state tensor per table, found {len(tensors)}"
        )
    if not tensors:
        return torch.zeros(whole_local(stored.weight, "offloaded tables").shape[0], 0)
    return tensors[0]
