"""Timing of benchmark steps, one definition for every benchmark: wall-clock seconds, or the
process's CPU seconds (with one thread, the time the step itself computed, whatever else runs)."""

from __future__ import annotations

import gc
import time
from typing import Callable, Iterable, TypeVar

B = TypeVar("B")


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def seconds_of(work: Callable[[], object], clock: str = "wall") -> float:
    """Seconds `work()` takes on `clock` (a key of `CLOCKS`)."""
    now = CLOCKS[clock]
    start = now()
    work()
    return now() - start


def time_steps(
    step: Callable[[B], object], batches: Iterable[B], collect_garbage: bool = True, clock: str = "wall"
) -> float:
    """Seconds of ``step(batch)`` over `batches`, in order, on `clock`; garbage is collected first
    (off the clock) unless `collect_garbage` is False."""
    if collect_garbage:
        gc.collect()
    return seconds_of(lambda: [step(batch) for batch in batches], clock)
