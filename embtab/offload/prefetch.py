"""The prefetcher: wraps a data loader and caches each batch's rows before the batch is handed over.

A CTR loader knows the ids of the next batches before they are trained, so a background thread
reads up to `window` batches ahead, and admits batch j into the caches (writing back evicted dirty
rows, loading the missing rows with their optimizer state) while batches before j train. Batch j is
admitted only when at most `ahead` batches are waiting in front of it, and only into slots no batch
in flight needs: a slot is evictable once the training step of the last batch that used it has
finished. A step counts as finished when the next batch is requested (or at `flush` / `close`), the
contract of a plain ``for batch in prefetcher: train_step(batch)`` loop.

Checkpointing, evaluation and the end of training must see every trained row in the stores:
`flush` writes the dirty cached rows back (call it between steps); `close` (also on exhaustion and
on leaving a ``with`` block) stops the thread and flushes.

Example::

    offload = embtab.offload.attach(dmp, {"item": MmapStore.open(path, rows, 64, 1)})
    with Prefetcher(loader, offload, window=8) as batches:
        for batch in batches:
            loss = loss_fn(dmp(batch.sparse), batch.labels); loss.backward(); dense_opt.step()
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

import torch
from torchrec import KeyedJaggedTensor

from embtab.offload.attach import Offload

B = TypeVar("B")


class _End:
    pass


class _Stopped(Exception):
    pass


def sparse_of(batch: Any) -> KeyedJaggedTensor:
    """The ids of a batch: a `KeyedJaggedTensor` itself, or its ``.sparse`` (`data.batch.Batch`)."""
    return batch if isinstance(batch, KeyedJaggedTensor) else batch.sparse


class Prefetcher(Generic[B]):
    """Iterate over `loader` with every batch's offloaded rows already in the caches.

    Args:
        loader: any iterable of batches (a `KeyedJaggedTensor` or an object with ``.sparse``).
        offload: the caches, from `embtab.offload.attach`.
        window: batches read ahead of the one being admitted (the look-ahead policy's horizon).
        ahead: batches admitted ahead of the consumer; they pin their rows, so the caches must
            hold the distinct rows of ``ahead + 1`` batches for the thread never to wait.
        train: mark the rows of handed-over batches dirty (False for evaluation).
        sparse: how to get the `KeyedJaggedTensor` of a batch.
        nice: scheduling niceness of the thread (Linux, per thread): above 0 the training step's
            threads take the cores first and the thread fills the gaps (serial parts of the step).
        background: admit in a background thread (default). False admits each batch on the
            caller's thread when it is requested: no overlap, but no competition for the cores
            and the GIL either, which is faster when the store is RAM on a machine with few cores.
    """

    def __init__(
        self,
        loader: Iterable[B],
        offload: Offload,
        window: int = 8,
        ahead: int = 2,
        train: bool = True,
        sparse: Callable[[B], KeyedJaggedTensor] = sparse_of,
        nice: int = 0,
        background: bool = True,
    ) -> None:
        if window < 0 or ahead < 0:
            raise ValueError(f"window and ahead must be >= 0, got {window} and {ahead}")
        self.loader, self.offload, self.window, self.ahead = loader, offload, window, ahead
        self.train, self.sparse, self.nice, self.background = train, sparse, nice, background
        self.waits: list[float] = []
        self._queue: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._batches: Iterator[B] = iter(())
        self._started = self._closed = self._stop = False
        self._first = self._done = self._handed = 0
        self._admitted = 0

    # ------------------------------------------------------------------------------ consumer side
    def __iter__(self) -> Iterator[B]:
        if not self._started:
            if self.offload.active:
                raise RuntimeError("another Prefetcher drives these caches; close it first (it holds batches in flight)")
            self.offload.active, self._started = True, True
            self._first = self.offload.clock
            self._finish_steps(self._first - 1)
            self._batches = self._admitted_batches()
            if self.background:
                self._thread = threading.Thread(target=self._run, name="embtab-prefetch", daemon=True)
                self._thread.start()
        return self

    def __next__(self) -> B:
        iter(self)
        self._finish_steps(self._first + self._handed - 1)
        start = time.perf_counter()
        item = self._queue.get() if self.background else self._next_inline()
        self.waits.append(time.perf_counter() - start)
        if isinstance(item, _End):
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close(flush=False)
            raise item
        self._handed += 1
        return item

    def _next_inline(self) -> B | _End:
        """The next admitted batch, admitted here on one intra-op thread (small indexing ops run
        faster without an OpenMP team on a busy machine)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return next(self._batches, _End())
        finally:
            torch.set_num_threads(threads)

    def _finish_steps(self, step: int) -> None:
        """Batches up to `step` are trained: release their slots and wake the thread."""
        if torch.cuda.is_available():
            event = torch.cuda.Event()
            event.record()
            for cache in self.offload.caches.values():
                cache.mover.step_done = event
        with self._cond:
            self._done = step
            self.offload.set_done(step)
            self._cond.notify_all()

    def flush(self) -> None:
        """Write every trained row back to the stores; call it between steps (e.g. to checkpoint)."""
        self._finish_steps(self._first + self._handed - 1)
        self.offload.flush()

    def close(self, flush: bool = True) -> None:
        """Stop the thread; batches admitted but not handed over are dropped; flush the caches."""
        if not self._started or self._closed:
            return
        self._closed = True
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.offload.clock = self._first + self._admitted
        self._finish_steps(self.offload.clock - 1)
        self.offload.active = False
        if flush:
            self.offload.flush()

    def __enter__(self) -> "Prefetcher[B]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def wait_seconds(self) -> float:
        """Total time `__next__` waited for the thread."""
        return sum(self.waits)

    # ------------------------------------------------------------------------------ thread side
    def _run(self) -> None:
        torch.set_num_threads(1)  # this thread's OpenMP teams only: leave the cores to the step
        if self.nice and hasattr(os, "setpriority"):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        try:
            for batch in self._batches:
                self._queue.put(batch)
            self._queue.put(_End())
        except _Stopped:
            pass
        except BaseException as error:  # handed to the consumer, which raises it
            self._queue.put(error)

    def _admitted_batches(self) -> Iterator[B]:
        """The loader's batches, each yielded once its rows are admitted into the caches."""
        batches = iter(self.loader)
        pending: deque = deque()
        exhausted = False
        while not self._stop:
            while not exhausted and len(pending) <= self.window:
                batch = next(batches, _End)
                if batch is _End:
                    exhausted = True
                else:
                    pending.append((batch, self.offload.ids_of(self.sparse(batch))))
                    self.offload.enter_window(pending[-1][1])
            if not pending:
                return
            batch, ids = pending.popleft()
            self.offload.leave_window(ids)
            self._admit(ids, [later for _, later in pending])
            yield batch

    def _admit(self, ids: dict[str, torch.Tensor], window: list[dict[str, torch.Tensor]]) -> None:
        step = self._first + self._admitted
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or step <= self._done + 1 + self.ahead)
                if self._stop:
                    raise _Stopped
                done = self._done
            with self.offload.locks():
                caches = self.offload.caches
                plans = {n: c.plan(ids[n], step, [w[n] for w in window]) for n, c in caches.items()}
                if all(p is not None for p in plans.values()):
                    for name, plan in plans.items():
                        caches[name].admit(plan, step, self.train)
                    self._admitted += 1
                    return
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._done != done)
