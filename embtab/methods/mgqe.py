"""MGQE: multi-granular quantized embeddings (Kang et al., WWW 2020, "Learning Multi-granular
Quantized Embeddings for Large-Vocab Categorical Features in Recommender Systems").

DPQ (`embtab.methods.dpq`) where an id's frequency decides how many codewords it may use: the hot
ids (``hot_ids``, e.g. the top 10% by training count from `embtab.methods.frequency.hottest_ids`)
choose among all ``codewords`` of each part, every other id only among the first
``rare_codewords``. One codebook serves both groups (the rare ids' codewords are a prefix of it),
as in the benchmark (Hetu ``MGQEmbedding``: 256 and 64 codewords, 4 parts). At inference a rare
id's code needs only ``ceil(log2 rare_codewords)`` bits, which `export_bytes` counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from embtab.config import LogicalTable
from embtab.methods.dpq import DPQ, DPQMethod, code_bits
from embtab.checks import check_int
from embtab.methods.frequency import HotIds, check_hot_ids
from embtab.registry import MethodKind, register_method


@register_method(MethodKind.EXPORT_COMPRESSED)
@dataclass(frozen=True)
class MGQE(DPQ):
    """DPQ with two frequency groups: hot ids use all codewords, the rest a prefix.

    Args:
        parts, codewords, beta: as in `DPQ` (defaults: the benchmark's 4 parts, 256 codewords).
        rare_codewords: codewords the ids outside `hot_ids` may use (the first ones; 64).
        hot_ids: the frequent ids (distinct, below the cardinality).
    """

    name = "mgqe"

    parts: int = 4
    codewords: int = 256
    rare_codewords: int = 64
    hot_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "hot_ids", tuple(self.hot_ids))

    def build(self, table: LogicalTable) -> "MGQEMethod":
        self._check(table)
        check_int(table.name, "rare_codewords", self.rare_codewords, 1)
        if self.rare_codewords > self.codewords:
            raise ValueError(
                f"table {table.name!r}: rare_codewords must be <= codewords={self.codewords}, "
                f"got {self.rare_codewords}"
            )
        check_hot_ids(table.name, self.hot_ids, table.cardinality)
        return MGQEMethod(table, self)


class MGQEMethod(DPQMethod):
    def __init__(self, table: LogicalTable, spec: MGQE) -> None:
        super().__init__(table, spec.parts, spec.codewords, spec.beta)
        self.rare_codewords = spec.rare_codewords
        self.hot = HotIds(spec.hot_ids, bases=[0])

    def export_bytes(self) -> int:
        hot = self.hot.count
        rare = self.table.cardinality - hot
        bits = self.parts * (hot * code_bits(self.codewords) + rare * code_bits(self.rare_codewords))
        return -(-bits // 8) + self.codebook.numel() * 4 + hot * 8
