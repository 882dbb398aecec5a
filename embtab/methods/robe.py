"""ROBE: random offset block embeddings (Desai et al., MLSys 2022, "Random Offset Block Embedding
Array for Efficient Training of Deep Learning Recommendation Models").

Every table that uses a `ROBE` spec with the same `table` name reads ONE circular array ``M`` of
``m = 4 * rows`` floats. A vector of width ``d`` is ``Z`` chunks of ``L = d / Z`` floats; chunk
``c`` of id ``x`` of logical table ``t`` reads the ``L`` consecutive floats starting at the hashed
offset ``o = h(x, t, c) mod m`` (wrapping around the end), each times its own sign:

    e[c * L + j] = g(x, t, c, j) * M[(o + j) mod m],     g in {-1, +1}.

The benchmark (Hetu) uses ``Z = 1`` (one offset per vector, the default); the paper's ROBE-Z lets
``Z`` grow up to ``d`` (``Z = d``: every float hashed on its own, i.e. HashedNet-style sharing).

In the fused lookup the array is one torchrec table of ``rows`` rows of 4 floats (fbgemm's widths
are multiples of 4): a read at offset ``o`` covers rows ``floor(o / 4) + t`` (mod rows) for
``t < P = floor((L + 6) / 4)``, enough for any ``o mod 4``; `combine` concatenates the P rows,
takes the L floats from ``o mod 4`` on, and applies the signs. Offsets and signs are
`embtab.hashing` hashes (SplitMix64-based, salted with the logical table's name, so features that
share a logical table read identical floats); the signs of a chunk are the low bits of one 64-bit
hash per 64 floats. The signs depend on the id, so lookups are per id and pooled features are
combined, then pooled (``pooling_commutes = False``).

Memory: ``4 * rows`` floats in all, whatever the number of tables on the array (the budget knob
``rows``, like `Multiplexed`). ``max_id`` is ``None``: any non-negative id hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from embtab.config import LogicalTable, MethodSpec
from embtab.hashing import hash64, hash_to_range, salt_of
from embtab.methods.base import PhysicalTable, TableMethod
from embtab.methods.frequency import check_int

ROW_FLOATS = 4
SIGN_BITS = 64


@dataclass(frozen=True)
class ROBE(MethodSpec):
    """Read every vector from the shared circular array `table` (``4 * rows`` floats).

    Args:
        rows: the array holds ``4 * rows`` floats (the budget knob; bytes grow with it).
        chunks: Z, hashed offsets per vector (each chunk ``dim / Z`` consecutive floats); 1 as in
            the benchmark.
        table: name of the shared array; specs with the same name share it (and must agree on
            `rows`).
        salt: seeds the offset and sign hashes (combined with the logical table's name).
    """

    name = "robe"
    size_field: ClassVar[str] = "rows"
    size_increasing: ClassVar[bool] = True

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
            raise ValueError(f"table {table.name!r}: the shared array name must be non-empty, got {self.table!r}")
        return ROBEMethod(table, self)


def probes_per_chunk(length: int) -> int:
    """Rows of 4 floats that hold ``length`` consecutive floats from any offset: ``ceil((length + 3) / 4)``."""
    return (length + 2 * ROW_FLOATS - 2) // ROW_FLOATS


class ROBEMethod(TableMethod):
    pooling_commutes = False
    combine_uses_ids = True

    def __init__(self, table: LogicalTable, spec: ROBE) -> None:
        super().__init__(table)
        self.rows, self.chunks = spec.rows, spec.chunks
        self.floats = ROW_FLOATS * spec.rows
        self.length = table.dim // spec.chunks
        self.probes = probes_per_chunk(self.length)
        self.offset_salts = [salt_of(table.name, spec.salt, "offset", c) for c in range(spec.chunks)]
        words = -(-self.length // SIGN_BITS)
        self.sign_salts = [
            [salt_of(table.name, spec.salt, "sign", c, w) for w in range(words)] for c in range(spec.chunks)
        ]
        self.physical_tables = (PhysicalTable(spec.table, spec.rows, ROW_FLOATS),) * (spec.chunks * self.probes)
        self.max_id = None

    def hashes(self) -> list[tuple[int, int]]:
        return [(self.floats, salt) for salt in self.offset_salts]

    def remap_hashed(self, ids: torch.Tensor, hashed: list[torch.Tensor]) -> torch.Tensor:
        first_rows = [torch.div(offset, ROW_FLOATS, rounding_mode="floor") for offset in hashed]
        steps = torch.arange(self.probes, device=ids.device).unsqueeze(1)
        return torch.cat([torch.remainder(row + steps, self.rows) for row in first_rows])

    def combine(self, vectors: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(torch.int64)
        positions = torch.arange(self.length, device=ids.device)
        chunks = []
        for c in range(self.chunks):  # Z chunks (1 by default), each vectorized over every id
            window = torch.cat(vectors[c * self.probes : (c + 1) * self.probes], dim=-1)
            shift = hash_to_range(ids, self.floats, self.offset_salts[c]) % ROW_FLOATS
            floats = torch.gather(window, -1, shift.unsqueeze(-1) + positions)
            chunks.append(floats * self._signs(ids, self.sign_salts[c], positions).to(floats.dtype))
        return chunks[0] if self.chunks == 1 else torch.cat(chunks, dim=-1)

    @staticmethod
    def _signs(ids: torch.Tensor, salts: list[int], positions: torch.Tensor) -> torch.Tensor:
        """``[..., L]`` of +-1: bit j % 64 of the chunk's hash word j // 64 gives float j's sign."""
        words = torch.stack([hash64(ids, salt) for salt in salts], dim=-1)
        word = words[..., positions // SIGN_BITS] if len(salts) > 1 else words
        bit = torch.bitwise_right_shift(word, positions % SIGN_BITS) & 1
        return 1 - 2 * bit
