"""DPQ: differentiable product quantization (Chen et al., ICML 2020, "Differentiable Product
Quantization for End-to-End Embedding Compression"), its VQ variant as the benchmark runs it.

Training keeps a full query table ``Q`` (``n x d``, the fused physical table) and a codebook of
``C`` codewords per part (``D x C x d/D``, a dense parameter of the method). Id ``x``'s query is
cut into ``D`` parts; part ``p`` snaps to its nearest codeword (squared Euclidean distance)

    c_p(x) = argmin_k ||q_p(x) - K[p, k]||^2,      v_p(x) = K[p, c_p(x)]

and the output is ``q + sg(v - q)``: the codeword in the forward pass, the identity (straight-
through) for the query's gradient. The codewords learn only from the paper's codebook term
``||v - sg(q)||^2`` (summed over the looked-up ids and elements, times ``beta``). That term reaches
the codebook inside the backward pass of the snap (its gradient ``2 beta (v - q)``, scattered to
the chosen codewords, scaled by the number of ranks so the data-parallel average is the global
batch's term): training with DPQ needs no change to the loss or the trainer, and no state is kept
between the forward and the backward. Padded per-id slots (id -1) carry no term.

At inference only the codes (``n x D``, ``ceil(log2 C)`` bits each) and the codebook are kept:
`DPQMethod.codes` gives the codes of every id from the trained query table, `export_bytes` their
size. Export ratio against the float32 table (``4 d`` bytes per id):
``4 d / (D ceil(log2 C) / 8)`` plus the codebook; at ``d = 16`` the benchmark's ``D = 8, C = 32``
gives 12.8x, ``D = 4, C = 256`` (MGQE's) 16x. Training itself holds the full table plus the
codebook, so a byte budget below the full table is out of reach while training (the method has no
size knob).

Differences from the benchmark (Hetu ``DPQEmbedding``, mode ``vq``): no batch normalization of the
distances before the argmin (Hetu normalizes each codeword's distances over the batch, so an id's
code depends on the rest of its batch), and the codebook term is summed rather than averaged over
the batch's elements (so its weight does not change with the batch size or the number of ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from embtab.config import LogicalTable, MethodSpec
from embtab.methods.base import BoundAfterFusing, PhysicalTable
from embtab.checks import check_int
from embtab.registry import MethodKind, register_method

if TYPE_CHECKING:
    from embtab.fused_state import FusedTables

SEARCH_BLOCK = 1024  # distinct ids per block of the nearest-codeword search


@register_method(MethodKind.EXPORT_COMPRESSED)
@dataclass(frozen=True)
class DPQ(MethodSpec):
    """Product-quantized vectors: D parts, each one of C codewords; trains a full query table.

    Args:
        parts: D, parts per vector (must divide the width).
        codewords: C, codewords per part (at most 2**16).
        beta: weight of the codebook term ``beta * ||v - sg(q)||^2``.
    """

    name = "dpq"

    parts: int = 8
    codewords: int = 32
    beta: float = 1.0

    def build(self, table: LogicalTable) -> "DPQMethod":
        self._check(table)
        return DPQMethod(table, self.parts, self.codewords, self.beta)

    def _check(self, table: LogicalTable) -> None:
        check_int(table.name, "parts", self.parts, 1)
        check_int(table.name, "codewords", self.codewords, 1)
        if table.dim % self.parts:
            raise ValueError(
                f"table {table.name!r}: parts={self.parts} does not divide the width {table.dim}; "
                "expected a divisor of the width"
            )
        if self.codewords > 2**16:
            raise ValueError(f"table {table.name!r}: codewords must be <= 65536, got {self.codewords}")
        if not self.beta >= 0:
            raise ValueError(f"table {table.name!r}: beta must be >= 0, got {self.beta!r}")


def code_bits(codewords: int) -> int:
    """Bits of one code: ``ceil(log2 C)`` (at least 1)."""
    return max(1, math.ceil(math.log2(codewords)))


class SnapToCodewords(torch.autograd.Function):
    """Forward: the chosen codewords. Backward: the output's gradient to the query unchanged
    (straight-through), and ``2 * weight * (v - q)`` of every valid slot to its codewords."""

    @staticmethod
    def forward(
        ctx: Any,
        parts: torch.Tensor,
        codebook: torch.Tensor,
        codes: torch.Tensor,
        weight: torch.Tensor,
    ) -> torch.Tensor:
        flat = codes + torch.arange(codes.shape[-1], device=codes.device) * codebook.shape[1]
        rows = codebook.reshape(-1, codebook.shape[-1]).index_select(0, flat.reshape(-1))
        chosen = rows.view(*flat.shape, codebook.shape[-1])
        ctx.save_for_backward(parts, chosen, flat, weight)
        ctx.codebook_shape = codebook.shape
        return chosen

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        parts, chosen, flat, weight = ctx.saved_tensors
        pull = 2 * (chosen - parts) * weight.unsqueeze(-1).unsqueeze(-1)
        shape = ctx.codebook_shape
        codebook_grad = pull.new_zeros(shape[0] * shape[1], shape[2])
        codebook_grad.index_add_(0, flat.reshape(-1), pull.reshape(-1, shape[2]))
        return grad, codebook_grad.view(shape), None, None


class DPQMethod(BoundAfterFusing):
    pooling_commutes = False
    combine_uses_ids = True

    def __init__(self, table: LogicalTable, parts: int, codewords: int, beta: float) -> None:
        super().__init__(table)
        self.parts, self.codewords, self.beta = parts, codewords, beta
        self.part_dim = table.dim // parts
        self.physical_tables = (PhysicalTable(table.name, table.cardinality, table.dim),)
        bound = table.cardinality ** -0.5  # the query table's own (torchrec default) range
        codebook = torch.empty(parts, codewords, self.part_dim).uniform_(-bound, bound)
        self.codebook = nn.Parameter(codebook)
        self.process_group: dist.ProcessGroup | None = None

    def bind_fused(self, fused: "FusedTables") -> None:
        """The commitment loss is a global mean: its weight scales with the ranks fused over."""
        self.process_group = fused.process_group

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.unsqueeze(0)

    def allowed(self, ids: torch.Tensor) -> torch.Tensor | None:
        """How many codewords (the first ones) each id may use, shaped like `ids` (None: all);
        MGQE narrows it for rare ids."""
        return None

    def assign(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., D]`` (int64) of queries ``[..., d]``: each part's nearest allowed codeword.

        An id's query is the same wherever it occurs, so the search runs once per distinct id.
        Ids that may use the same number of codewords (MGQE: hot and rare) are searched together,
        over that prefix of the codebook only, in blocks of `SEARCH_BLOCK` ids (``D x block x C``
        distances at a time, small enough to stay in cache)."""
        distinct, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        positions = torch.arange(inverse.numel(), device=ids.device)
        first = torch.empty_like(distinct).scatter_(0, inverse, positions)  # one position of each
        flat_queries = queries.detach().reshape(-1, self.parts, self.part_dim)
        parts = flat_queries.index_select(0, first).transpose(0, 1)  # [D, distinct, d/D]
        allowed = self.allowed(distinct)
        if allowed is None:
            codes = self._nearest(parts, self.codewords)
        else:
            codes = torch.empty(self.parts, distinct.numel(), dtype=torch.int64, device=ids.device)
            for limit in allowed.unique().tolist():  # a few groups (MGQE: two), never single ids
                members = torch.nonzero(allowed == limit).squeeze(1)
                codes[:, members] = self._nearest(parts.index_select(1, members), limit)
        return codes.index_select(1, inverse).t().reshape(*ids.shape, self.parts)

    def _nearest(self, parts: torch.Tensor, limit: int) -> torch.Tensor:
        """Per part, the index of the nearest of the first `limit` codewords: ``[D, n]`` of
        ``parts`` ``[D, n, d/D]``. The distance up to the query's own norm, ``||k||^2 - 2 q.k``,
        is one batched product of ``[q, 1]`` with ``[-2 k; ||k||^2]``."""
        codebook = self.codebook.detach()[:, :limit]
        keys = torch.cat([-2 * codebook, codebook.square().sum(-1, keepdim=True)], -1).transpose(1, 2)
        ones = parts.new_ones(*parts.shape[:-1], 1)
        augmented = torch.cat([parts, ones], -1)  # [D, n, d/D + 1]
        codes = torch.empty(parts.shape[:2], dtype=torch.int64, device=parts.device)
        for start in range(0, parts.shape[1], SEARCH_BLOCK):  # blocks of ids, not single ids
            block = slice(start, start + SEARCH_BLOCK)
            codes[:, block] = torch.bmm(augmented[:, block], keys).argmin(-1)
        return codes

    def combine(self, vectors: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        queries = vectors[0]
        codes = self.assign(queries, ids)
        parts = queries.reshape(*queries.shape[:-1], self.parts, self.part_dim)
        weight = (ids >= 0).to(queries.dtype) * (self.beta * self._ranks())
        return SnapToCodewords.apply(parts, self.codebook, codes, weight).reshape(queries.shape)

    def _ranks(self) -> int:
        group = self.process_group
        return dist.get_world_size(group) if group is not None else 1

    @torch.no_grad()
    def codes(self, query_weights: torch.Tensor) -> torch.Tensor:
        """The export: codes ``[n, D]`` of every id from the trained query table ``[n, d]``."""
        ids = torch.arange(query_weights.shape[0], device=query_weights.device)
        return self.assign(query_weights, ids)

    def export_bytes(self) -> int:
        """Bytes at inference: bit-packed codes (``n * D * ceil(log2 C)`` bits) + float32 codebook."""
        code_bytes = -(-self.table.cardinality * self.parts * code_bits(self.codewords) // 8)
        return code_bytes + self.codebook.numel() * 4
