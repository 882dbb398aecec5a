"""The few collectives embtab needs outside torchrec's own: variable-length gathers across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank and the group's size; ``(0, 1)`` when no process group is open."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_rows(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's `values` (any number of rows, same trailing shape) concatenated in rank order,
    on every rank; `values` itself on one process."""
    if rank_and_world(group)[1] == 1:
        return values
    count = torch.tensor([values.shape[0]], device=values.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, count, group=group)
    longest = int(max(counts))
    padding = values.new_zeros((longest - values.shape[0], *values.shape[1:]))
    padded = torch.cat([values, padding])
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[: int(n)] for g, n in zip(gathered, counts)])
