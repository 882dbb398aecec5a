"""ROBE: random offset block embeddings (Desai et al., MLSys 2022, "Random Offset Block Embedding
Array for Efficient Training of Deep Learning Recommendation Models").

Every table that uses a `ROBE` spec with the same `table` name reads ONE circular array ``M`` of
``m = w * rows`` floats (``w`` below). A vector of width ``d`` is ``Z`` chunks of ``L = d / Z``
floats; chunk ``c`` of id ``x`` of logical table ``t`` reads the ``L`` consecutive floats starting
at the hashed offset ``o = h(x, t, c) mod m`` (wrapping around the end), each times its own sign:

    e[c * L + j] = g(x, t, c, j) * M[(o + j) mod m],     g in {-1, +1}.

The benchmark (Hetu) uses ``Z = 1`` (one offset per vector, the default); the paper's ROBE-Z lets
``Z`` grow up to ``d`` (``Z = d``: every float hashed on its own, i.e. HashedNet-style sharing).

In the fused lookup the array is one torchrec table of ``rows`` rows of ``w`` floats, ``w`` the
chunk length L rounded up to a multiple of 4 (fbgemm's widths): a read at offset ``o`` covers rows
``floor(o / w) + t`` (mod rows) for ``t < P = floor((L + 2w - 2) / w)`` (2 for ``L > 1``), enough
for any ``o mod w``; `combine` takes the P rows side by side (for a run of tables with one feature
each, a view of the fused lookup's output), reads the L floats from ``o mod w`` on as one block and applies
the signs. fbgemm's CPU kernels cost about the same per looked-up row whatever its width,
so a chunk costs two lookups where the hashing trick's row costs one (offsets aligned to whole
rows would make it one, but then no two ids share part of a block: the hashing trick with signs).

Offsets and signs are `embtab.hashing` hashes (SplitMix64-based, salted with the logical table's
name, so features that share a logical table read identical floats). The signs of a chunk are the
top bits of 64-bit hashes, 32 floats per word: word 0 is the offset's own hash (``o`` is its top
63 bits mod ``m``, so for arrays up to 2**31 floats its top 32 bits are free of ``o`` when ``m`` is
a power of two, and practically so otherwise), so a chunk of up to 32 floats costs one hash in the
remap and the same one again in the combine. The signs depend on the id, so lookups are per id and
pooled features are combined, then pooled (``pooling_commutes = False``).

Memory: ``w * rows`` floats in all, whatever the number of tables on the array (the budget knob
``rows``, like `Multiplexed`). ``max_id`` is ``None``: any non-negative id hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from embtab.config import LogicalTable
from embtab.hashing import hash64_salted, salt_of
from embtab.methods.base import PhysicalTable, SizedSpec, TableMethod
from embtab.checks import check_int
from embtab.registry import MethodKind, register_method

SIGN_BITS = 32  # signs per 64-bit hash word: its top 32 bits
ONE_BITS = 0x3F800000  # the float32 1.0


@register_method(MethodKind.COMPRESSION)
@dataclass(frozen=True)
class ROBE(SizedSpec):
    """Read every vector from the shared circular array `table` (``w * rows`` floats).

    Args:
        rows: the array holds ``w * rows`` floats, ``w = dim / chunks`` rounded up to a multiple
            of 4 (the budget knob; bytes grow with it).
        chunks: Z, hashed offsets per vector (each chunk ``dim / Z`` consecutive floats); 1 as in
            the benchmark.
        table: name of the shared array; specs with the same name share it (and must agree on
            `rows`).
        salt: seeds the offset and sign hashes (combined with the logical table's name).
    """

    name = "robe"
    size_field: ClassVar[str] = "rows"
    size_increasing: ClassVar[bool] = True
    size_scope: ClassVar[str] = "spec"

    rows: int
    chunks: int = 1
    table: str = "robe"
    salt: int = 0

    def build(self, table: LogicalTable) -> "ROBEMethod":
        check_int(table.name, "rows", self.rows, 1)
        check_int(table.name, "chunks", self.chunks, 1)
        if table.dim % self.chunks:
            raise ValueError(
                f"table {table.name!r}: chunks={self.chunks} does not divide the width {table.dim}; "
                "expected a divisor of the width"
            )
        if not self.table:
            raise ValueError(
                f"table {table.name!r}: the shared array name must be non-empty, got {self.table!r}"
            )
        return ROBEMethod(table, self)


def row_floats(length: int) -> int:
    """Width of the array's rows for chunks of `length` floats: `length` rounded up to 4."""
    return -(-length // 4) * 4


def probes_per_chunk(length: int, width: int) -> int:
    """Rows of `width` floats that hold `length` consecutive floats from any offset:
    ``ceil((length + width - 1) / width)``."""
    return (length + 2 * width - 2) // width


class ROBEMethod(TableMethod):
    pooling_commutes = False
    combine_uses_ids = True
    distinct_ids = True

    def __init__(self, table: LogicalTable, spec: ROBE) -> None:
        super().__init__(table)
        self.rows, self.chunks = spec.rows, spec.chunks
        self.length = table.dim // spec.chunks
        self.width = row_floats(self.length)
        self.floats = self.width * spec.rows
        self.probes = probes_per_chunk(self.length, self.width)
        self.offset_salts = [salt_of(table.name, spec.salt, "offset", c) for c in range(spec.chunks)]
        words = -(-self.length // SIGN_BITS)
        self.sign_salts = [
            [salt_of(table.name, spec.salt, "sign", c, w) for w in range(1, words)]
            for c in range(spec.chunks)
        ]
        array = PhysicalTable(spec.table, spec.rows, self.width)
        self.physical_tables = (array,) * (spec.chunks * self.probes)
        self.max_id = None
        self.array = spec.table

    def hashes(self) -> list[tuple[int, int]]:
        return [(self.floats, salt) for salt in self.offset_salts]

    def remap_hashed(self, ids: torch.Tensor, hashed: list[torch.Tensor]) -> torch.Tensor:
        first_rows = [torch.div(offset, self.width, rounding_mode="floor") for offset in hashed]
        steps = torch.arange(self.probes, device=ids.device).unsqueeze(1)
        return torch.cat([torch.remainder(row + steps, self.rows) for row in first_rows])

    def combine_signature(self) -> tuple | None:
        """Tables on one array with one chunk layout read in one `ROBERun` (their own salts)."""
        return ("robe", self.array, self.rows, self.chunks, self.length)

    def grouped(self, members: Sequence[TableMethod]) -> "ROBERun":
        """The run of tables `members` (this one first), read in one call."""
        return ROBERun(members)  # type: ignore[arg-type]

    def combine(self, vectors: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        rows = torch.stack([v.reshape(-1, self.width) for v in vectors], 1)  # [ids, probes, width]
        block = rows.reshape(rows.shape[0], 1, len(vectors), 1, self.width)
        return ROBERun([self]).combine(block, ids.reshape(-1, 1, 1)).reshape(*ids.shape, -1)


class ROBERun:
    """ROBE tables of one array and chunk layout read in one call, each table hashed with its
    own salts."""

    def __init__(self, members: Sequence[ROBEMethod]) -> None:
        first = members[0]
        self.chunks, self.probes, self.length = first.chunks, first.probes, first.length
        self.width, self.floats = first.width, first.floats
        self.offset_salts = [[m.offset_salts[c] for m in members] for c in range(self.chunks)]
        words = len(first.sign_salts[0])
        self.sign_salts = [
            [[m.sign_salts[c][w] for m in members] for w in range(words)] for c in range(self.chunks)
        ]

    def combine(self, block: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Vectors ``[rows, tables, features, dim]`` of ids ``[rows, tables, features]`` from
        their looked-up rows `block` ``[rows, tables, chunks * P, features, width]``: a chunk's
        window is its P rows side by side (a view of the block when there is one feature)."""
        ids = ids.to(torch.int64)
        chunks = []
        for c in range(self.chunks):  # Z chunks (1 by default), each vectorized over every id
            window = block[:, :, c * self.probes : (c + 1) * self.probes].movedim(2, 3).flatten(-2)
            word = hash64_salted(ids, self.offset_salts[c], 1)
            # the remap's offset (hash_to_range: the top 63 bits mod m), from the same 64-bit hash
            offset = torch.bitwise_right_shift(word, 1).bitwise_and_(2**63 - 1) % self.floats
            signs = self._signs(word, ids, self.sign_salts[c], self.length).to(window.dtype)
            chunks.append(SignedBlocks.apply(window, offset % self.width, signs))
        return chunks[0] if self.chunks == 1 else torch.cat(chunks, dim=-1)

    @staticmethod
    def _signs(first: torch.Tensor, ids: torch.Tensor, salts: list[list[int]], length: int) -> torch.Tensor:
        """``[..., L]`` float32 signs: float j is negated where bit ``63 - j % 32`` of hash word
        ``j // 32`` is set (word 0 the offset's hash `first`, the others hashed with `salts`, per
        table). The word's top 32 bits, shifted left by ``j % 32``, keep that bit as their sign
        bit, which becomes the sign of 1.0 (IEEE-754 bits ``0x3F800000``)."""
        words = [first, *(hash64_salted(ids, s, 1) for s in salts)]
        top = torch.stack([torch.bitwise_right_shift(w, 32).to(torch.int32) for w in words], -1)
        shifts = torch.arange(min(length, SIGN_BITS), dtype=torch.int32, device=ids.device)
        shifted = torch.bitwise_left_shift(top.unsqueeze(-1), shifts).flatten(-2)[..., :length]
        return shifted.bitwise_and_(-(2**31)).bitwise_or_(ONE_BITS).view(torch.float32)


class SignedBlocks(torch.autograd.Function):
    """``blocks[..., j] = signs[..., j] * windows[..., start + j]`` for ``j < L`` (`signs`
    ``[..., L]``): each block is one contiguous run of floats, read (and its gradient written)
    whole through a view of the flat windows in which row ``r`` is the L floats from flat
    position ``r`` on, and signed in place."""

    @staticmethod
    def forward(ctx, windows: torch.Tensor, starts: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        length, size = signs.shape[-1], windows.shape[-1]
        firsts = torch.arange(starts.numel(), device=starts.device) * size + starts.reshape(-1)
        ctx.save_for_backward(firsts, signs)
        ctx.shape = windows.shape
        blocks = _runs(windows.reshape(-1), length).index_select(0, firsts)
        return blocks.reshape(signs.shape).mul_(signs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        firsts, signs = ctx.saved_tensors
        flat = grad.new_zeros(ctx.shape.numel())
        # the blocks of different rows never overlap, so each float is written at most once
        signed = (grad * signs).reshape(firsts.numel(), signs.shape[-1])
        _runs(flat, signs.shape[-1]).index_copy_(0, firsts, signed)
        return flat.reshape(ctx.shape), None, None


def _runs(flat: torch.Tensor, length: int) -> torch.Tensor:
    """``[positions, length]`` view of `flat` whose row ``r`` is ``flat[r : r + length]``."""
    return flat.as_strided((max(flat.numel() - length + 1, 0), length), (1, 1))
