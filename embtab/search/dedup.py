"""Dedup's stage: which blocks of a trained table merge, and the merged table (`embtab.methods.dedup`).

The benchmark's procedure (Hetu ``Deduplicator``, after Zhou et al.), vectorized:

1. cut the ``[n, d]`` table into ``m`` blocks of ``block_rows`` rows (the last one padded with
   zeros), each flattened to a vector;
2. visit the blocks in ascending order of their 75th percentile; each block may merge into a block
   visited before it;
3. candidates: blocks that share an L2-LSH bucket ``ceil((a . x + b) / r)`` (``a`` Gaussian,
   ``b ~ U[0, r)``) in any of ``L`` bands;
4. a candidate is a duplicate when at least ``similarity`` of the elements differ by at most
   ``tolerance``; a block merges into its most similar duplicate;
5. merges are taken in visiting order until only ``blocks`` blocks remain.

Each block's best earlier duplicate does not depend on the merges before it (a merged block stays a
candidate, as in the benchmark, and reads what its own target reads), so the whole stage is a few
tensor operations: the candidate and similarity matrices, one argmax per block, the first merges in
visiting order, and the chains of merges resolved by pointer jumping. When fewer blocks pass the
test than the budget needs, ``relax`` merges the remaining blocks into their nearest earlier block
(squared L2 distance over the elements both hold), nearest first; without it the budget is refused.

Differences from the benchmark: the padded last block may also be a merge target (compared on the
rows both blocks hold; Hetu never inserts it into the index), duplicates tie-break on the lowest
block index, and the budget is met exactly (Hetu stops early when it runs out of duplicates, so
some of its Dedup results are over budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from embtab.methods.dedup import Dedup

PAIR_CHUNK = 1 << 12  # candidate pairs compared at a time
ROW_CHUNK = 256  # blocks whose LSH buckets are compared with all others at a time


@dataclass(frozen=True)
class DedupPlan:
    """The stage's result for one table.

    Attributes:
        block_map: ``[m]`` the stored block each logical block reads (int64).
        kept: ``[blocks]`` the logical block whose trained values each stored block starts from.
        duplicates: merges that passed the closeness test.
        relaxed: merges made by ``relax`` (nearest earlier block).
    """

    block_map: torch.Tensor
    kept: torch.Tensor
    duplicates: int
    relaxed: int


def blocks_of(weights: torch.Tensor, block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flattened blocks ``[m, block_rows * d]``, mask of their real (unpadded) elements)."""
    n, d = weights.shape
    m = -(-n // block_rows)
    padded = weights.new_zeros(m * block_rows, d)
    padded[:n] = weights
    real = torch.zeros(m * block_rows, d, dtype=torch.bool, device=weights.device)
    real[:n] = True
    return padded.reshape(m, -1), real.reshape(m, -1)


def visiting_order(blocks: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Blocks in ascending order of the 75th percentile of their real elements (stable)."""
    quartile = torch.nanquantile(blocks.masked_fill(~real, float("nan")), 0.75, dim=1)
    return torch.sort(quartile, stable=True).indices


def lsh_buckets(blocks: torch.Tensor, width: float, bands: int, seed: int) -> torch.Tensor:
    """``[m, bands]`` L2-LSH buckets ``ceil((x . a_l + b_l) / width)`` of every block."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(blocks.shape[1], bands, generator=generator, dtype=torch.float64)
    b = torch.rand(bands, generator=generator, dtype=torch.float64) * width
    return torch.ceil((blocks.to(torch.float64) @ a + b) / width).to(torch.int64)


def collisions(buckets: torch.Tensor) -> torch.Tensor:
    """``[m, m]`` whether two blocks share a bucket in any band."""
    m = buckets.shape[0]
    out = torch.empty(m, m, dtype=torch.bool)
    for start in range(0, m, ROW_CHUNK):  # chunks of blocks bound the [chunk, m, bands] compare
        rows = buckets[start : start + ROW_CHUNK]
        out[start : start + ROW_CHUNK] = (rows.unsqueeze(1) == buckets.unsqueeze(0)).any(-1)
    return out


def pair_similarity(
    blocks: torch.Tensor, real: torch.Tensor, pairs: torch.Tensor, tolerance: float
) -> torch.Tensor:
    """Share of the elements both blocks of each pair ``[P, 2]`` hold that differ by <= tolerance."""
    out = torch.empty(pairs.shape[0], dtype=torch.float64)
    for start in range(0, pairs.shape[0], PAIR_CHUNK):  # chunks of pairs bound the memory
        i, j = pairs[start : start + PAIR_CHUNK].unbind(1)
        both = real[i] & real[j]
        close = ((blocks[i] - blocks[j]).abs() <= tolerance) & both
        out[start : start + PAIR_CHUNK] = close.sum(1).double() / both.sum(1).double()
    return out


def squared_distances(blocks: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``[m, m]`` squared L2 distances over the elements both blocks hold (only the last block
    has padding: its row and column are recomputed on its real elements)."""
    x = blocks.to(torch.float64)
    out = torch.cdist(x, x).square()
    held = int(real[-1].sum())
    if held < blocks.shape[1]:
        last = torch.cdist(x[-1:, :held], x[:, :held]).square().squeeze(0)
        out[-1], out[:, -1] = last, last
    return out


def deduplicate(weights: torch.Tensor, spec: Dedup) -> DedupPlan:
    """Merge blocks of the trained table `weights` ``[n, d]`` until ``spec.blocks`` remain.

    Raises:
        ValueError: fewer blocks pass the closeness test than the budget needs and ``relax`` is off.
    """
    blocks, real = blocks_of(weights.detach().float().cpu(), spec.block_rows)
    m = blocks.shape[0]
    needed = m - spec.blocks
    if needed < 0:
        raise ValueError(f"blocks={spec.blocks} exceeds the table's {m} blocks; expected blocks <= {m}")
    order = visiting_order(blocks, real)
    rank = torch.empty(m, dtype=torch.int64)
    rank[order] = torch.arange(m)
    earlier = rank.unsqueeze(0) < rank.unsqueeze(1)  # [i, j]: j visited before i
    candidates = collisions(lsh_buckets(blocks, spec.lsh_width, spec.lsh_bands, spec.seed)) & earlier
    pairs = candidates.nonzero()
    score = torch.full((m, m), -1.0, dtype=torch.float64)
    score[pairs[:, 0], pairs[:, 1]] = pair_similarity(blocks, real, pairs, spec.tolerance)
    best_score, best = score.max(1)
    duplicate = best_score >= spec.similarity
    target = torch.arange(m)
    merged = order[duplicate[order]][:needed]  # merges in visiting order, until the budget holds
    target[merged] = best[merged]
    relaxed = needed - merged.numel()
    extra = torch.zeros(0, dtype=torch.int64)
    if relaxed > 0:
        if not spec.relax:
            raise ValueError(
                f"only {merged.numel()} of the {m} blocks pass the closeness test (similarity >= "
                f"{spec.similarity} at tolerance {spec.tolerance}); blocks={spec.blocks} needs {needed} merges "
                "(set relax to merge the nearest blocks)"
            )
        distance = squared_distances(blocks, real).masked_fill(~earlier, float("inf"))
        nearest_distance, nearest = distance.min(1)
        open_ = (target == torch.arange(m)) & torch.isfinite(nearest_distance)
        extra = torch.nonzero(open_).squeeze(1)
        extra = extra[torch.sort(nearest_distance[extra], stable=True).indices[:relaxed]]
        target[extra] = nearest[extra]
    root = _roots(target)
    kept = order[(root == torch.arange(m))[order]]
    index = torch.full((m,), -1, dtype=torch.int64)
    index[kept] = torch.arange(kept.numel())
    return DedupPlan(index[root], kept, int(merged.numel()), int(extra.numel()))


def _roots(target: torch.Tensor) -> torch.Tensor:
    """Follow each block's merge target to a block that is not merged (targets are visited
    earlier, so the chains end), by pointer jumping."""
    root = target.clone()
    for _ in range(max(1, math.ceil(math.log2(max(2, root.numel())))) + 1):
        root = root[root]
    return root


def merged_weights(weights: torch.Tensor, plan: DedupPlan, block_rows: int) -> torch.Tensor:
    """The stored table ``[blocks * block_rows, d]``: each kept block's trained rows (padding zero)."""
    blocks, _ = blocks_of(weights.detach(), block_rows)
    return blocks[plan.kept].reshape(-1, weights.shape[1])
