"""DHE: deep hash embeddings (Kang et al., KDD 2021, "Learning to Embed Categorical Features
without Embedding Tables for Recommendation").

No table: an id ``x`` is encoded by ``k`` hash functions into a dense code, each hash's bucket in
``[0, m)`` mapped to ``[-1, 1]`` (the paper's uniform encoding)

    c_i(x) = 2 * h_i(x) / (m - 1) - 1,     i < k      (k = 1024, m = 10**6 in the paper)

and a deep MLP maps the code to the embedding: ``layers`` hidden layers of ``hidden`` units, each
Linear, batch normalization, Mish, then a Linear to ``d`` (the VLDB benchmark's layout). The
hashes are embtab's SplitMix64 hashes (`embtab.hashing`), one 64-bit hash of the id mixed with
each function's index, instead of the paper's ``((a x + b) mod p) mod m``; both give k independent
uniform buckets per id.

In the collection DHE is a method with no physical table: `remap` gives no rows, and `combine`
computes every vector from the ids (``combine_uses_ids``), per id, then pooled. Its bytes are the
MLP's parameters (and batch norm's running statistics), independent of the number of ids; the
number of hash functions (the code's width, the first layer's inputs) is the budget knob, one
hidden layer's width of bytes per function. Every looked-up id costs a forward and backward pass
of the MLP.

Batch normalization normalizes over the ids of the local batch; under data-parallel training each
rank uses its own ids' statistics, so ``batch_norm=False`` is the setting that trains identically
on any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from embtab.config import LogicalTable
from embtab.hashing import hash64, hash_to_range, salt_of
from embtab.methods.base import SizedSpec, TableMethod
from embtab.checks import check_int
from embtab.registry import MethodKind, register_method

_GOLDEN_GAMMA = -0x61C8864680B583EB  # 0x9e3779b97f4a7c15 as an int64: spreads the functions' keys


@register_method(MethodKind.COMPRESSION)
@dataclass(frozen=True)
class DHE(SizedSpec):
    """k hashes of the id, a dense code in [-1, 1], a deep MLP to the table's width.

    Args:
        hashes: k, hash functions (the code's width; the budget knob: bytes grow by
            ``4 * hidden`` with each).
        hidden: units of every hidden layer.
        layers: hidden layers (Linear, batch norm, Mish each).
        buckets: m, each hash's range before the map to [-1, 1].
        batch_norm: batch normalization in every hidden layer (the paper's and benchmark's).
        salt: seeds the hashes (combined with the table name).
    """

    name = "dhe"
    size_field: ClassVar[str] = "hashes"
    size_increasing: ClassVar[bool] = True

    hashes: int = 1024
    hidden: int = 64
    layers: int = 5
    buckets: int = 10**6
    batch_norm: bool = True
    salt: int = 0

    def build(self, table: LogicalTable) -> "DHEMethod":
        for field, minimum in (("hidden", 1), ("hashes", 1), ("layers", 1), ("buckets", 2)):
            check_int(table.name, field, getattr(self, field), minimum)
        return DHEMethod(table, self)


def encode(ids: torch.Tensor, hashes: int, buckets: int, salt: int) -> torch.Tensor:
    """The dense codes ``[..., hashes]`` in [-1, 1]: bucket ``h_i(id)`` of ``[0, buckets)`` of
    function i, scaled. Function i hashes ``hash64(id) + i * G`` (wrapping int64) once more."""
    keys = hash64(ids, salt).unsqueeze(-1) + torch.arange(hashes, device=ids.device) * _GOLDEN_GAMMA
    bucket = hash_to_range(keys, buckets, salt)
    return bucket.to(torch.float32) * (2.0 / (buckets - 1)) - 1.0


class DHEMethod(TableMethod):
    pooling_commutes = False
    combine_uses_ids = True

    def __init__(self, table: LogicalTable, spec: DHE) -> None:
        super().__init__(table)
        self.functions, self.buckets = spec.hashes, spec.buckets
        self.salt = salt_of(table.name, spec.salt, "dhe")
        self.physical_tables = ()
        self.max_id = None
        blocks: list[nn.Module] = []
        width = spec.hashes
        for _ in range(spec.layers):
            blocks.append(nn.Linear(width, spec.hidden))
            if spec.batch_norm:
                blocks.append(nn.BatchNorm1d(spec.hidden))
            blocks.append(nn.Mish())
            width = spec.hidden
        blocks.append(nn.Linear(width, table.dim))
        self.mlp = nn.Sequential(*blocks)

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.new_empty((0, ids.numel()), dtype=torch.int64)

    def combine(self, vectors: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """The MLP of every id's code. The code and the first layer (``k x hidden``, the bulk of
        the work) depend on the id alone, so they run once per distinct id and are gathered back;
        batch normalization and the later layers see every id, as in the paper."""
        distinct, inverse = torch.unique(ids.reshape(-1).to(torch.int64), return_inverse=True)
        first, rest = self.mlp[0], self.mlp[1:]
        hidden = first(encode(distinct, self.functions, self.buckets, self.salt))
        return rest(hidden.index_select(0, inverse)).reshape(*ids.shape, self.table.dim)
