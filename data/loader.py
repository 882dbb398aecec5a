"""Deterministic, resumable batching of a `CTRDataset` through a torch `DataLoader`.

The sampler yields one index tensor per batch; the dataset's `__getitems__` turns it into a
`Batch` with vectorized gathers. Epoch ``e``'s order is a function of ``(seed, e)`` only, and an
iteration can start at any batch position, so a training run interrupted after batch ``b`` of
epoch ``e`` resumes with exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from data.batch import Batch, CTRDataset

_MASK64 = (1 << 63) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch `epoch`'s shuffle: a mix of (seed, epoch), so runs with nearby seeds do not
    see shifted copies of each other's epoch orders."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 1) & _MASK64


class BatchIndexSampler(Sampler[torch.Tensor]):
    """Yields int64 index tensors, one per batch, for epoch `epoch` from batch `start_batch` on.

    Call `set_epoch(e)` before each epoch (and `set_epoch(e, start_batch=b)` to resume); the
    sampler never advances the epoch on its own, so iterating twice without it repeats the order.

    With ``part = (rank, world_size)`` it yields rank `rank`'s contiguous share of every global
    batch of `batch_size` samples (shares differ by at most one sample), so the ranks of a
    distributed run together see exactly the batches of a one-process run; a last global batch
    smaller than `world_size` is dropped so that no rank gets an empty one.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        part: tuple[int, int] = (0, 1),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rank, world = part
        if not 0 <= rank < world or batch_size < world:
            raise ValueError(
                f"part {part} must be (rank, world_size) with 0 <= rank < world_size <= batch_size "
                f"({batch_size})"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.part = part
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order the next iteration yields, starting at `start_batch`."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(
                f"start_batch must lie in [0, {self.num_batches}] (the batches per epoch), "
                f"got {start_batch}"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    @property
    def num_batches(self) -> int:
        """Batches in a full epoch."""
        full, tail = divmod(self.num_samples, self.batch_size)
        keeps_tail = tail >= self.part[1] and not self.drop_last
        return full + int(keeps_tail)

    def global_batch_size(self, batch: int) -> int:
        """Samples in global batch `batch` of an epoch, over all ranks."""
        return min(self.batch_size, self.num_samples - batch * self.batch_size)

    def order(self) -> torch.Tensor:
        """All sample indices of the current epoch, in the order they are served."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[torch.Tensor]:
        batches = torch.split(self.order(), self.batch_size)[self.start_batch : self.num_batches]
        rank, world = self.part
        return iter(b.tensor_split(world)[rank] for b in batches)

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def state_dict(self) -> dict[str, int]:
        """Epoch and start position, e.g. for a checkpoint (the caller tracks batches consumed)."""
        return {"epoch": self.epoch, "start_batch": self.start_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a `state_dict`."""
        self.set_epoch(int(state["epoch"]), int(state["start_batch"]))


def _identity(batch: Batch) -> Batch:
    """Collate function: the dataset already returns a whole `Batch`."""
    return batch


def make_dataloader(
    ds: CTRDataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    part: tuple[int, int] = (0, 1),
) -> DataLoader:
    """A `DataLoader` over `ds` yielding `Batch` objects in a deterministic order.

    The loader's `batch_sampler` is a `BatchIndexSampler`: call
    ``loader.batch_sampler.set_epoch(e)`` each epoch, or ``set_epoch(e, start_batch=b)`` to
    resume after `b` batches of epoch `e` (`epoch` and `start_batch` here set the first one).
    `part` = ``(rank, world_size)`` serves one rank's share of each batch.
    """
    sampler = BatchIndexSampler(len(ds), batch_size, shuffle, seed=seed, drop_last=drop_last, part=part)
    sampler.set_epoch(epoch, start_batch)
    return DataLoader(ds, batch_sampler=sampler, collate_fn=_identity, num_workers=num_workers)
