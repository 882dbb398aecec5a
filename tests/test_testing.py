"""The test harness's spawned ranks: a rank's exception reaches the caller, a passing run
returns (its ranks skip the interpreter's teardown after their work is written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessRaisedException

from embtab.testing import run_ranks


def _write_sum(rank: int, world_size: int, folder: str) -> None:
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    torch.save(total, Path(folder) / f"rank{rank}.pt")


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 saw a bad batch")


def test_every_rank_writes_its_result_and_the_run_returns(tmp_path):
    run_ranks(_write_sum, 2, str(tmp_path))
    assert [float(torch.load(tmp_path / f"rank{r}.pt")) for r in range(2)] == [3.0, 3.0]


def test_a_rank_exception_reaches_the_caller():
    with pytest.raises(ProcessRaisedException, match="rank 1 saw a bad batch"):
        run_ranks(_fail_on_rank_one, 2)
