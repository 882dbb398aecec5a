"""Frequency-aware hybrid for hashed methods: the hottest ids get exclusive rows, the rest hash.

Zhang et al. 2020 ("Model size reduction using frequency based double hashing for recommender
systems", arXiv 2007.14523) give the most frequent ids collision-free embeddings and double-hash
the long tail. Here a hashed method's spec takes ``hot_ids`` (the N hottest ids, computed by the
caller from vocabulary counts with `hottest_ids`); its remap sends the r-th hot id (in ascending id
order) to an exclusive row ``base + r`` appended after the hashed rows, and every other id through
the hash. The lookup is a `searchsorted` over the N sorted hot ids: vectorized, O(N) memory.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def hottest_ids(counts: torch.Tensor, n: int) -> tuple[int, ...]:
    """The (at most) `n` ids with the largest counts, ascending; ties go to the smaller id.

    `counts[i]` is how often id ``i`` occurs (e.g. a vocabulary's counts); ids never seen
    (count 0) are never hot, so fewer than `n` ids come back when fewer than `n` occur.
    """
    if counts.dim() != 1 or counts.is_floating_point() or counts.dtype == torch.bool:
        raise ValueError(
            f"counts must be a 1-d integer tensor, got {counts.dtype} of shape {tuple(counts.shape)}"
        )
    if n < 0:
        raise ValueError(f"hottest_ids: n must be >= 0, got {n}")
    counts = counts.to(torch.int64)
    if counts.numel() and int(counts.min()) < 0:
        raise ValueError(f"counts must be >= 0, got {int(counts.min())}")
    # A stable sort of -count keeps ids of equal count in ascending id order.
    order = torch.sort(-counts, stable=True).indices[: min(n, counts.numel())]
    order = order[counts[order] > 0]
    return tuple(int(i) for i in torch.sort(order).values)


def check_hot_ids(table: str, hot_ids: Sequence[int], cardinality: int | None = None) -> None:
    """Hot ids must be distinct, non-negative integers (and below `cardinality` when given)."""
    if not hot_ids:
        return
    try:
        ids = torch.tensor(hot_ids, device="cpu")
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"table {table!r}: hot_ids must be int64 ids, got {list(hot_ids[:5])!r} (first 5)"
        ) from error
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise ValueError(
            f"table {table!r}: hot_ids must be a flat sequence of ints, got {ids.dtype} values"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (cardinality is not None and high >= cardinality):
        bad = low if low < 0 else high
        raise ValueError(
            f"table {table!r}: hot id {bad} is out of range; expected 0 <= id < {cardinality}"
        )
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"table {table!r}: hot_ids has duplicates; expected distinct ids")


class HotIds(nn.Module):
    """The sorted hot ids of one table, where each probe's exclusive rows start, and the lookup.

    Both are non-persistent buffers (derived from the spec, so not checkpointed; they move with
    the module). Probe ``p`` of the ``r``-th hot id reads row ``bases[p] + r`` of its table.
    """

    def __init__(self, hot_ids: Sequence[int], bases: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer(
            "sorted_ids", torch.tensor(sorted(hot_ids), dtype=torch.int64), persistent=False
        )
        self.register_buffer(
            "bases", torch.tensor(list(bases), dtype=torch.int64).unsqueeze(1), persistent=False
        )

    @property
    def count(self) -> int:
        """N, the number of hot ids."""
        return self.sorted_ids.numel()

    def find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(is_hot, rank)`` per id: whether it is hot and its position among the sorted hot ids."""
        rank = torch.searchsorted(self.sorted_ids, ids).clamp_(max=self.count - 1)
        return self.sorted_ids[rank] == ids, rank

    def route(self, ids: torch.Tensor, hashed: torch.Tensor) -> torch.Tensor:
        """Rows ``[P, n]``: probe p of a hot id reads ``bases[p] + rank``, other ids `hashed[p]`."""
        if self.count == 0:
            return hashed
        is_hot, rank = self.find(ids)
        return torch.where(is_hot, self.bases + rank, hashed)
