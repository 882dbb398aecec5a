"""Offloaded tables in a training run: host-RAM stores, their caches, prefetching and checkpoints.

A trainer builds `OffloadedTraining.of(model, dmp, ...)` after `embtab.fuse` (None when the model
has no offloaded table) and reads batches through `batches`, which caches each batch's rows ahead.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from embtab.methods.offloaded import OffloadedMethod
from embtab.offload.attach import Offload, attach
from embtab.offload.prefetch import Prefetcher
from embtab.offload.store import RamStore
from embtab.optimizers import state_width_of

B = TypeVar("B")


def offloaded_methods(model: nn.Module) -> list[OffloadedMethod]:
    return [m for m in model.modules() if isinstance(m, OffloadedMethod)]


class OffloadedTraining:
    """The offload side of training a fused model: a host-RAM store per offloaded table (its rows
    live there, the fused table caches them), the batches prefetched, the stores in checkpoints."""

    def __init__(self, dmp: nn.Module, stores: dict[str, RamStore]) -> None:
        self.stores = stores
        self.offload: Offload = attach(dmp, stores)
        self._active: Prefetcher | None = None

    @classmethod
    def of(
        cls, model: nn.Module, dmp: nn.Module, optimizer_kind: str, seed: int, world: int
    ) -> OffloadedTraining | None:
        """Fresh stores (seeded) for the offloaded tables of `model`, attached to its fused `dmp`;
        None without offloaded tables. Offloaded tables train on one process (`world` 1)."""
        methods = offloaded_methods(model)
        if not methods:
            return None
        if world > 1:
            raise ValueError("offloaded tables train on one process; drop --distributed or the offloaded method")
        stores = {
            m.table.name: RamStore.create(
                m.table.cardinality, m.table.dim, state_width_of(optimizer_kind, m.table.dim), seed=seed, name=m.table.name
            )
            for m in methods
        }
        return cls(dmp, stores)

    @contextmanager
    def batches(self, loader: Iterable[B], train: bool) -> Iterator[Prefetcher[B]]:
        """`loader` through a `Prefetcher` (each batch's rows cached ahead; leaving writes the
        trained rows back)."""
        with Prefetcher(loader, self.offload, train=train) as prefetcher:
            self._active = prefetcher
            try:
                yield prefetcher
            finally:
                self._active = None

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every store's rows and optimizer state (the cached rows written back first)."""
        if self._active is not None:
            self._active.flush()
        return {name: store.state_dict() for name, store in self.stores.items()}

    def load_state_dict(self, dmp: nn.Module, saved: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore the stores and attach them afresh (empty caches: the stores hold every row)."""
        for name, store in self.stores.items():
            store.load_state_dict(saved[name])
        self.offload = attach(dmp, self.stores)

    def check_fits(self, batches: Iterable[KeyedJaggedTensor], size: int, split: str) -> None:
        """Every batch's distinct rows (batches of `size` samples of `split`) must fit each cache;
        every id is range-checked on the way."""
        for sparse in batches:
            for name, rows in self.offload.ids_of(sparse).items():
                needed, slots = int(rows.unique().numel()), self.offload.caches[name].slots
                if needed > slots:
                    raise ValueError(
                        f"offload cache {name!r} has {slots} rows (cache_rows) but an evaluation batch "
                        f"of {size} {split} samples needs {needed} distinct rows; lower [train] "
                        f"eval_batch_size (to about {max(1, size * slots // needed)}) or raise cache_rows"
                    )
