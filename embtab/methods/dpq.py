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

The search (`CodebookRun`) runs once per distinct id of the batch, for a whole run of DPQ tables
at once (`DPQMethod.grouped`): ``||k||^2 - 2 q.k`` (the distance up to the query's own norm) comes
from one batched product per table, and its first minimum along the codewords (exact ties go to the
lower index, as with ``argmin``) from a max pooling of the negated distances, which torch reduces
vectorized where ``argmin`` over the codewords is about 20x slower.

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
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from embtab.config import LogicalTable, MethodSpec
from embtab.methods.base import BoundAfterFusing, PhysicalTable, TableMethod
from embtab.checks import check_int
from embtab.hashing import along
from embtab.methods.frequency import HotIds
from embtab.registry import MethodKind, register_method

if TYPE_CHECKING:
    from embtab.fused_state import FusedTables

SEARCH_BLOCK = 500_000  # distances per block of the nearest-codeword search (about 2 MB; see `_nearest`)


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
    """Forward: each id's chosen codewords. Backward: the output's gradient to the query unchanged
    (straight-through), and ``2 * weight * (v - q)`` of every distinct id to its codewords (its
    weight counts its valid slots, so the codebook sees the sum over the looked-up ids)."""

    @staticmethod
    def forward(
        ctx: Any,
        queries: torch.Tensor,
        codebooks: torch.Tensor,
        rows: torch.Tensor,
        inverse: torch.Tensor,
        parts: torch.Tensor,
        weight: torch.Tensor,
    ) -> torch.Tensor:
        """`rows` ``[M * D]``: each distinct id's codeword rows of the flat `codebooks`;
        `inverse` ``[N]``: each slot's distinct id; `parts` ``[M, D, d/D]``: the distinct queries."""
        width = codebooks.shape[-1]
        chosen = gather_rows(codebooks.reshape(-1, width), rows)
        ctx.save_for_backward(chosen, rows, parts, weight)
        ctx.codebook_shape = codebooks.shape
        return chosen.view(parts.shape[0], queries.shape[-1]).index_select(0, inverse).view(queries.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        chosen, rows, parts, weight = ctx.saved_tensors
        pull = (chosen.view(parts.shape) - parts).mul_(2 * weight.view(-1, 1, 1))
        shape = ctx.codebook_shape
        codebook_grad = add_rows(pull.new_zeros(shape.numel() // shape[-1], shape[-1]), rows, pull.view(-1, shape[-1]))
        return grad, codebook_grad.view(shape), None, None, None, None


# Short rows are gathered and summed several times faster as single wide elements of their bytes.
_WHOLE_ROW = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}
_PAIRS = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table.index_select(0, index)`` of a contiguous ``[n, w]`` table, each row copied as one
    element of its bytes' width where there is such a dtype (a bitwise copy)."""
    wide = _WHOLE_ROW.get(table.shape[1] * table.element_size())
    if wide is None:
        return table.index_select(0, index)
    return table.view(wide).view(-1).index_select(0, index).view(table.dtype).view(-1, table.shape[1])


def add_rows(total: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``total.index_add_(0, index, rows)`` of contiguous ``[n, w]`` tensors, adding each pair of
    floats as one complex number where `w` is even (the same float additions, fewer elements)."""
    pair = _PAIRS.get(total.dtype)
    if pair is None or total.shape[1] % 2:
        return total.index_add_(0, index, rows)
    shape = (-1,) if total.shape[1] == 2 else (-1, total.shape[1] // 2)
    total.view(pair).view(shape).index_add_(0, index, rows.view(pair).view(shape))
    return total


def first_nearest(keys: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Per batch, the first codeword of largest ``keys @ points`` (the nearest): ``[B, n]``
    indices of ``[B, L, n]`` scores.

    The reduction over the middle axis is a max pooling over it, read as a channels-last image
    (``n`` channels, an ``L x 1`` image): torch reduces that layout vectorized across the ids and
    keeps the first maximum, as `argmax` does (whose reduction of the same axis is about 20x
    slower on CPU)."""
    scores = torch.bmm(keys, points)
    batch, codewords, n = scores.shape
    image = scores.as_strided((batch, n, codewords, 1), (codewords * n, 1, n, n))
    _, index = nn.functional.max_pool2d(image, (codewords, 1), return_indices=True)
    return index.view(batch, n)


class CodebookRun:
    """DPQ tables (of equal parts, codewords, rare codewords and beta) snapped in one call.

    Each slot's key is ``table * span + id + 1`` (pads, id -1, are ``table * span``), so one
    `torch.unique` gives every table's distinct ids, sorted by table. The search runs once per
    distinct id: over all codewords for an id that may use them all, over the first
    `rare_codewords` for the others (MGQE's rare ids). Both the search and the snap read the
    tables' codebooks stacked (``[T, D, C, d/D]``), whose gradient autograd hands back to each
    table's codebook.
    """

    def __init__(self, members: Sequence["DPQMethod"]) -> None:
        head = members[0]
        self.members = list(members)
        self.parts, self.part_dim, self.beta = head.parts, head.part_dim, head.beta
        self.codewords, self.rare_codewords = head.codewords, head.rare_codewords
        self.span = max(m.table.cardinality for m in members) + 1
        self.key_dtype = torch.int32 if len(members) * self.span < 2**31 else torch.int64
        self.hot = head.hot_key_mask(self.members, self.span) if self.rare_codewords < self.codewords else None

    def keys(self, ids: torch.Tensor, table_dim: int | None) -> torch.Tensor:
        """Each slot's key; `table_dim` is the tables' axis of `ids` (None: one table). Keys are
        int32 where they fit (`torch.unique` sorts them faster)."""
        keys = ids.to(torch.int64) + 1
        if table_dim is not None:
            offsets = torch.arange(len(self.members), device=ids.device) * self.span
            keys = keys + along(offsets, ids.dim(), table_dim)
        return keys.to(self.key_dtype)

    def combine(self, block: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Snapped vectors of the queries `block` ``[rows, tables, 1, features, d]`` (ids
        ``[rows, tables, features]``)."""
        return self.snap(block.squeeze(2), self.keys(ids, 1))

    def snap(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``q + sg(v - q)`` of queries ``[..., d]`` whose slots have `keys` ``[...]``."""
        books = [m.codebook for m in self.members]
        codebooks = torch.stack(books) if len(books) > 1 else books[0].unsqueeze(0)  # [T, D, C, d/D]
        search = self.search(queries, keys, codebooks.detach())
        valid = search.distinct % self.span != 0  # not a pad
        weight = (search.counts * valid).to(queries.dtype) * (self.beta * self.members[0].ranks())
        return SnapToCodewords.apply(queries, codebooks, search.rows.view(-1), search.inverse, search.parts, weight)

    def search(self, queries: torch.Tensor, keys: torch.Tensor, codebooks: torch.Tensor) -> "Search":
        """The nearest of `codebooks` (the members' own, stacked) to every distinct key, in search
        order (rare ids last)."""
        flat_keys = keys.reshape(-1)
        distinct, inverse, counts = torch.unique(flat_keys, return_inverse=True, return_counts=True)
        order, units = self._plan(distinct)
        if order is not None:
            rank = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
            distinct, counts = distinct.index_select(0, order), counts.index_select(0, order)
            inverse = rank.index_select(0, inverse)
        positions = torch.arange(inverse.numel(), device=keys.device)
        first = positions.new_empty(distinct.shape).scatter_(0, inverse, positions)  # one slot of each
        flat_queries = queries.detach().reshape(-1, self.parts, self.part_dim)
        parts = flat_queries.index_select(0, first)  # [M, D, d/D]
        return Search(distinct, inverse, counts, parts, self._nearest(codebooks, parts, units))

    def _plan(self, distinct: torch.Tensor) -> tuple[torch.Tensor | None, list[tuple[int, int, int, int]]]:
        """How to search the distinct keys: an order (None: as they are) and its units
        ``(table, codewords, start, stop)``, each a run of the ordered ids of one table that may
        use the first `codewords` codewords."""
        tables = distinct // self.span
        if self.hot is None:
            return None, self._units(tables, self.rare_codewords, 0)
        is_hot = self.hot.index_select(0, distinct)
        hot, rare = torch.nonzero(is_hot).squeeze(1), torch.nonzero(~is_hot).squeeze(1)
        units = self._units(tables.index_select(0, hot), self.codewords, 0)
        units += self._units(tables.index_select(0, rare), self.rare_codewords, hot.numel())
        return torch.cat([hot, rare]), units

    def _units(self, tables: torch.Tensor, codewords: int, offset: int) -> list[tuple[int, int, int, int]]:
        """Units of sorted table indices `tables`, starting at `offset` of the search order."""
        starts = torch.arange(len(self.members) + 1, dtype=tables.dtype, device=tables.device)
        edges = (torch.searchsorted(tables, starts) + offset).tolist()
        return [(t, codewords, a, b) for t, (a, b) in enumerate(zip(edges, edges[1:])) if b > a]

    def _nearest(
        self, codebooks: torch.Tensor, parts: torch.Tensor, units: list[tuple[int, int, int, int]]
    ) -> torch.Tensor:
        """Rows ``[M, D]`` of the stacked codebooks (``[T * D * C, d/D]``) nearest to distinct
        queries ``[M, D, d/D]``, unit by unit and in blocks of about `SEARCH_BLOCK` distances
        (a few MB, near the cache's size). The distance up to the query's own norm, ``||k||^2 - 2 q.k``, is
        (negated) one batched product of ``[2 k, -||k||^2]`` with ``[q, 1]``."""
        keys = torch.cat([2 * codebooks, -codebooks.square().sum(-1, keepdim=True)], -1).unbind(0)
        points = parts.new_empty(self.parts, self.part_dim + 1, parts.shape[0])
        points[:, : self.part_dim] = parts.permute(1, 2, 0)  # [D, d/D + 1, M]
        points[:, self.part_dim] = 1
        first_rows = torch.arange(len(keys) * self.parts, device=parts.device) * self.codewords
        first_rows = first_rows.view(-1, self.parts, 1).unbind(0)  # per table [D, 1]: codeword 0
        rows = []
        for table, codewords, start, stop in units:
            block = max(1, SEARCH_BLOCK // (self.parts * codewords))
            table_keys = keys[table] if codewords == self.codewords else keys[table][:, :codewords]
            for begin in range(start, stop, block):  # blocks of ids, never single ids
                nearest = first_nearest(table_keys, points[:, :, begin : min(begin + block, stop)])
                rows.append(nearest.add_(first_rows[table]).t())  # transposed while in cache
        return torch.cat(rows) if rows else first_rows[0].new_empty(0, self.parts)


@dataclass(frozen=True)
class Search:
    """A search's distinct keys (in search order) and, per distinct id: how many slots hold it,
    its query's parts ``[D, d/D]`` and its nearest codewords' rows ``[D]`` of the stacked
    codebooks; `inverse` maps each slot to its distinct id."""

    distinct: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor
    parts: torch.Tensor
    rows: torch.Tensor


class DPQMethod(BoundAfterFusing):
    pooling_commutes = False
    combine_uses_ids = True

    def __init__(self, table: LogicalTable, parts: int, codewords: int, beta: float) -> None:
        super().__init__(table)
        self.parts, self.codewords, self.beta = parts, codewords, beta
        self.rare_codewords = codewords  # MGQE: fewer for the ids outside `hot`
        self.hot: HotIds | None = None
        self.part_dim = table.dim // parts
        self.physical_tables = (PhysicalTable(table.name, table.cardinality, table.dim),)
        bound = table.cardinality ** -0.5  # the query table's own (torchrec default) range
        codebook = torch.empty(parts, codewords, self.part_dim).uniform_(-bound, bound)
        self.codebook = nn.Parameter(codebook)
        self.process_group: dist.ProcessGroup | None = None
        self._hot_masks: dict[tuple, torch.Tensor | None] = {}

    def bind_fused(self, fused: "FusedTables") -> None:
        """The commitment loss is a global mean: its weight scales with the ranks fused over."""
        self.process_group = fused.process_group

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.unsqueeze(0)

    def combine_signature(self) -> tuple | None:
        """Tables of one configuration snap in one `CodebookRun` (their own codebooks, hot ids)."""
        return ("dpq", self.parts, self.codewords, self.rare_codewords, self.part_dim, self.beta)

    def grouped(self, members: Sequence[TableMethod]) -> CodebookRun:
        """The run of tables `members` (this one first), snapped in one call."""
        return CodebookRun(members)  # type: ignore[arg-type]

    def hot_key_mask(self, members: Sequence["DPQMethod"], span: int) -> torch.Tensor | None:
        """Whether each key ``table * span + id + 1`` of the run `members` (this table first)
        holds a hot id, or None where no member has one; built once per run and device (hot
        ids never change)."""
        cache_key = (tuple(m.table.name for m in members), span, self.codebook.device)
        if cache_key not in self._hot_masks:
            hot = [m.hot.sorted_ids + (t * span + 1) for t, m in enumerate(members) if m.hot is not None]
            mask = torch.zeros(len(members) * span, dtype=torch.bool, device=self.codebook.device)
            if hot:
                mask[torch.cat(hot)] = True
            self._hot_masks[cache_key] = mask if bool(mask.any()) else None
        return self._hot_masks[cache_key]

    def assign(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., D]`` (int64) of queries ``[..., d]``: each part's nearest allowed codeword
        (`CodebookRun.search`: once per distinct id)."""
        run = CodebookRun([self])
        search = run.search(queries, run.keys(ids, None), self.codebook.detach().unsqueeze(0))
        codes = search.rows % self.codewords
        return codes.index_select(0, search.inverse).view(*ids.shape, self.parts)

    def combine(self, vectors: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        run = CodebookRun([self])
        return run.snap(vectors[0], run.keys(ids, None))

    def ranks(self) -> int:
        """Ranks the fused tables are averaged over (1 without a process group)."""
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
