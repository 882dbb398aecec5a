"""Wall-clock timing of benchmark steps, one definition for every benchmark."""

from __future__ import annotations

import gc
import time
from typing import Callable, Iterable, TypeVar

B = TypeVar("B")


def seconds_of(work: Callable[[], object]) -> float:
    """Wall-clock seconds `work()` takes."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def time_steps(step: Callable[[B], object], batches: Iterable[B], collect_garbage: bool = True) -> float:
    """Seconds of ``step(batch)`` over `batches`, in order; garbage is collected first (off the
    clock) unless `collect_garbage` is False."""
    if collect_garbage:
        gc.collect()
    return seconds_of(lambda: [step(batch) for batch in batches])
