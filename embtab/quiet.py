"""torchrec's expected, harmless warnings and log lines, silenced only around the calls that raise them.

torchrec 1.8 still hands out ShardedTensors (each use warns that they are deprecated), traces with
torch.fx APIs that warn about their own deprecation, and its planner logs that the topology was
built directly (embtab always builds it from the process group). None of it tells a user anything,
and a process-wide filter would also hide the user's own warnings, so each call is wrapped instead.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator


class _PlannerNoise(logging.Filter):
    """Drops the planner's warning that the topology is built directly: every plan we make
    triggers it (we build it from the process group) and it tells users nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "TopologyFactory" not in record.getMessage()


_EXPECTED_WARNINGS = (
    (FutureWarning, "Please use DTensor instead"),
    (FutureWarning, ".*torch.fx"),
    (DeprecationWarning, ".*torch.fx"),
    (UserWarning, ".*TopologyFactory"),
)


@contextmanager
def quiet_torchrec() -> Iterator[None]:
    """Silence, inside the block only, the expected warnings and planner log lines of torchrec."""
    planner_log = logging.getLogger("torchrec.distributed.planner.types")
    noise = _PlannerNoise()
    planner_log.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for category, message in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        planner_log.removeFilter(noise)
