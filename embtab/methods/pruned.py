"""A compact table: only the kept rows and columns of a pruned table are allocated.

This is what OptEmbed and PEP export to (and retrain in). For a logical table of ``n`` ids of width
``D``, ``kept`` rows of ``width`` columns are stored, plus one shared row (row ``kept``) that every
pruned id reads. The remap is a bitmap over the ``n`` ids with a running count per 32-bit word
(rank = count before the word + popcount of the lower bits): 1/4 byte per id, vectorized, no
per-id table. `combine` scatters the ``width`` stored columns into their places among the ``D``
output columns (``columns``, the leading ones for OptEmbed's width masks), the rest are zero.

Zeros stay zero while training (``freeze_zeros=True``): combine multiplies every looked-up vector
by ``(v != 0)``, so an exactly-zero element (the shared pruned row, PEP's pruned elements) gets no
gradient, and the fused optimizers (SGD, Adagrad, row-wise Adagrad) leave it at zero. That needs
the lookup per id (``pooling_commutes = False``); an inference export sets it False and pools in
the fused kernel.

The bitmap, counts and columns are persistent buffers: the spec gives their shapes, the state dict
their values (`embtab.search.export` fills them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embtab.checks import is_integer
from embtab.config import LogicalTable, MethodSpec
from embtab.methods.base import PhysicalTable, TableMethod
from embtab.registry import MethodKind, register_method

WORD_BITS = 32


def rank_buffer_bytes(cardinality: int) -> int:
    """Bytes of the remap: one int32 bitmap word and one int32 running count per 32 ids."""
    return 2 * 4 * -(-cardinality // WORD_BITS)


def pruned_parameter_bytes(cardinality: int, kept: int, width: int) -> int:
    """Float32 weights (kept rows plus the shared row), remap buffers and the column index."""
    return (kept + 1) * width * 4 + rank_buffer_bytes(cardinality) + width * 8


@register_method(MethodKind.SEARCH_RESULT)
@dataclass(frozen=True)
class PrunedTable(MethodSpec):
    """``kept`` rows x ``width`` columns of a table whose other rows and columns are pruned.

    Args:
        kept: rows stored (0 <= kept <= cardinality); every other id reads one shared row.
        width: stored columns (a multiple of 4, at most the table's width).
        freeze_zeros: keep exact zeros at zero while training (see the module docstring).
    """

    name = "pruned"

    kept: int = 0
    width: int = 4
    freeze_zeros: bool = True

    @staticmethod
    def physical_name(table: str) -> str:
        """Name of the compact physical table of logical table `table`."""
        return f"{table}@pruned"

    def build(self, table: LogicalTable) -> "PrunedMethod":
        if not is_integer(self.kept) or not 0 <= self.kept <= table.cardinality:
            raise ValueError(
                f"table {table.name!r}: kept must be an integer in [0, {table.cardinality}], got {self.kept!r}"
            )
        if not isinstance(self.width, int) or self.width < 4 or self.width % 4 or self.width > table.dim:
            raise ValueError(
                f"table {table.name!r}: width must be a multiple of 4 in [4, {table.dim}], got {self.width!r}"
            )
        return PrunedMethod(table, self)


def popcount32(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 value in ``[0, 2**32)`` (SWAR, no overflow in int64)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def pack_mask(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitmap words int32, kept rows before each word int32) of a boolean row mask ``[n]``."""
    words = -(-keep.numel() // WORD_BITS)
    bits = torch.zeros(words * WORD_BITS, dtype=torch.int64, device=keep.device)
    bits[: keep.numel()] = keep.to(torch.int64)
    weights = torch.bitwise_left_shift(torch.ones((), dtype=torch.int64), torch.arange(WORD_BITS))
    packed = (bits.view(words, WORD_BITS) * weights.to(keep.device)).sum(1)
    counts = bits.view(words, WORD_BITS).sum(1)
    before = torch.cumsum(counts, 0) - counts
    return _to_int32(packed), before.to(torch.int32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values (int64) stored as their int32 bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


class PrunedMethod(TableMethod):
    def __init__(self, table: LogicalTable, spec: PrunedTable) -> None:
        super().__init__(table)
        self.kept, self.width = spec.kept, spec.width
        self.freeze_zeros = spec.freeze_zeros
        self.pooling_commutes = not spec.freeze_zeros
        words = -(-table.cardinality // WORD_BITS)
        self.register_buffer("bitmap", torch.zeros(words, dtype=torch.int32))
        self.register_buffer("before", torch.zeros(words, dtype=torch.int32))
        self.register_buffer("columns", torch.arange(spec.width, dtype=torch.int64))
        self.physical_tables = (PhysicalTable(PrunedTable.physical_name(table.name), spec.kept + 1, spec.width),)

    def set_rows(self, keep: torch.Tensor) -> None:
        """Store the row mask ``[cardinality]`` (its count must equal ``kept``)."""
        if keep.shape != (self.table.cardinality,) or int(keep.sum()) != self.kept:
            raise ValueError(
                f"table {self.table.name!r}: row mask of shape {tuple(keep.shape)} with "
                f"{int(keep.sum())} kept rows; expected shape ({self.table.cardinality},) and {self.kept} kept"
            )
        bitmap, before = pack_mask(keep.to(self.bitmap.device))
        self.bitmap.copy_(bitmap)
        self.before.copy_(before)

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(torch.int64)
        word = torch.div(ids, WORD_BITS, rounding_mode="floor")
        bit = ids - word * WORD_BITS
        bits = self.bitmap[word].to(torch.int64) & 0xFFFFFFFF
        below = bits & (torch.bitwise_left_shift(torch.ones_like(bit), bit) - 1)
        rank = self.before[word].to(torch.int64) + popcount32(below)
        kept = ((bits >> bit) & 1).bool()
        return torch.where(kept, rank, self.kept).unsqueeze(0)

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        v = vectors[0]
        if self.freeze_zeros:
            v = v * (v != 0)
        out = v.new_zeros(*v.shape[:-1], self.table.dim)
        return out.index_copy(v.dim() - 1, self.columns, v)
