"""Quotient-remainder compositional embeddings (Shi et al., KDD 2020, arXiv 1909.02107).

With ``collisions = m``, id ``i`` of a table of ``n`` ids reads row ``i mod m`` of a remainder
table (m rows) and row ``floor(i / m)`` of a quotient table (``ceil(n / m)`` rows); the two vectors
are added, concatenated (each ``dim / 2`` wide) or multiplied elementwise. Memory
``(n/m + m) * dim`` is smallest near ``m = sqrt(n)``.

k complementary partitions (mixed radix, ``partitions = k``): ``p_j(i) = floor(i / M_j) mod m_j``
with ``M_j = m_1 * ... * m_{j-1}`` and ``m_1 * ... * m_k >= n``. The sizes are chosen as:

- ``m_1 = min(collisions, n)`` (the remainder digit; ``k = 2`` is exactly the QR trick above);
- then, with ``R_2 = ceil(n / m_1)`` ids' worth of quotient left, for ``j = 2 .. k``:
  ``m_j = ceil(R_j ** (1 / (k - j + 1)))`` (exact integer root) and ``R_{j+1} = ceil(R_j / m_j)``,
  so the last digit takes exactly ``m_k = R_k = ceil(n / M_k)`` rows. The quotient range is split
  into near-equal digits (~ ``(n / collisions) ** (1 / (k - 1))`` each) and the product is just
  enough: the mapping is a bijection from ``[0, n)`` into the digit tuples, so ``max_id = n``.

Arithmetic is int64 floor division and remainder (never floating point, which DLRM's
``qr_embedding_bag`` uses and which rounds for ids above 2**53).

Pooling: add and concat commute with a sum over a bag, so pooled features pool inside the fused
kernel; multiply does not (``sum_i q_i * r_i != (sum q) * (sum r)``), so pooled mult features are
looked up per id, multiplied, then pooled (DLRM's version pools first: wrong for multi-hot bags,
dlrm #366).

Initialization: every partition table is drawn from U(-a, a) with ``a = init_bound(...)`` chosen so
the combined vector has the full table's variance, U(-sqrt(1/n), sqrt(1/n)) per element: zero-mean
for ``mult`` too, unlike DLRM's all-positive ``U(sqrt(1/n), 1)``. (torchrec's default bound
sqrt(1/rows) would make the small remainder table dominate ``add`` and ``concat``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from embtab.checks import check_int
from embtab.config import LogicalTable
from embtab.methods.base import PhysicalTable, SizedSpec, TableMethod
from embtab.registry import MethodKind, register_method

OPERATIONS: tuple[str, ...] = ("mult", "add", "concat")


@register_method(MethodKind.COMPRESSION)
@dataclass(frozen=True)
class QREmbedding(SizedSpec):
    """k complementary partition tables (quotient and remainder for k = 2), combined per id.

    Args:
        collisions: m, rows of the remainder table (ids per quotient row); bytes DEcrease with
            it while it is below about ``sqrt(n)`` (the budget knob; search it in ``[1, isqrt(n)]``).
        operation: ``"mult"`` (elementwise product), ``"add"`` or ``"concat"`` (each ``dim / k``).
        partitions: k >= 2 (mixed radix; see the module docstring for the sizes).
    """

    name = "qr"
    size_field: ClassVar[str] = "collisions"
    size_increasing: ClassVar[bool] = False

    collisions: int
    operation: str = "mult"
    partitions: int = 2

    def build(self, table: LogicalTable) -> "QRMethod":
        self._check(table)
        return QRMethod(table, self)

    def _check(self, table: LogicalTable) -> None:
        for field, value, minimum in (("collisions", self.collisions, 1), ("partitions", self.partitions, 2)):
            check_int(table.name, field, value, minimum)
        if self.operation not in OPERATIONS:
            raise ValueError(
                f"table {table.name!r}: operation must be one of {OPERATIONS}, got {self.operation!r}"
            )
        k = self.partitions
        if self.operation == "concat" and (table.dim % k or (table.dim // k) % 4):
            raise ValueError(
                f"table {table.name!r}: concat of {k} partitions splits width {table.dim} into "
                f"{table.dim / k:.3g}; expected dim / partitions to be a multiple of 4"
            )


def ceil_root(x: int, k: int) -> int:
    """The smallest integer r >= 1 with ``r ** k >= x`` (exact, for Python ints)."""
    r = max(1, round(x ** (1.0 / k)))
    while r**k < x:
        r += 1
    while r > 1 and (r - 1) ** k >= x:
        r -= 1
    return r


def partition_sizes(cardinality: int, collisions: int, partitions: int) -> tuple[int, ...]:
    """The mixed-radix digit sizes ``(m_1, ..., m_k)`` of the module docstring; product >= n."""
    sizes = [min(collisions, cardinality)]
    left = -(-cardinality // sizes[0])
    for j in range(partitions - 1, 0, -1):
        size = ceil_root(left, j)
        sizes.append(size)
        left = -(-left // size)
    return tuple(sizes)


def mixed_radix_digits(ids: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Digits ``[k, n]`` of `ids` in the mixed radix `sizes`: ``p_j = floor(i / M_j) mod m_j``,
    the last digit unreduced (below ``sizes[-1]`` for ids below the product); exact int64."""
    ids = ids.to(torch.int64)
    digits, radix = [], 1
    for size in sizes[:-1]:
        quotient = ids if radix == 1 else torch.div(ids, radix, rounding_mode="floor")
        digits.append(torch.remainder(quotient, size))
        radix *= size
    digits.append(torch.div(ids, radix, rounding_mode="floor"))
    return torch.stack(digits)


def init_bound(operation: str, cardinality: int, partitions: int) -> float:
    """Bound a of ``U(-a, a)`` on every partition table so the combined vector's elements have the
    full table's variance ``1 / (3 n)`` (torchrec's ``U(-sqrt(1/n), sqrt(1/n))``).

    mult: ``(a**2 / 3)**k = 1 / (3 n)``; add: ``k * a**2 / 3 = 1 / (3 n)``; concat: ``a = sqrt(1/n)``.
    """
    n, k = cardinality, partitions
    if operation == "mult":
        return 3**0.5 * (3 * n) ** (-1 / (2 * k))
    return (1 / (k * n)) ** 0.5 if operation == "add" else (1 / n) ** 0.5


class QRMethod(TableMethod):
    def __init__(self, table: LogicalTable, spec: QREmbedding) -> None:
        super().__init__(table)
        self.operation = spec.operation
        self.pooling_commutes = spec.operation != "mult"
        self.sizes = partition_sizes(table.cardinality, spec.collisions, spec.partitions)
        width = table.dim // spec.partitions if spec.operation == "concat" else table.dim
        bound = init_bound(spec.operation, table.cardinality, spec.partitions)
        self.physical_tables = tuple(
            PhysicalTable(f"{table.name}@qr{j}", size, width, init=(-bound, bound))
            for j, size in enumerate(self.sizes)
        )

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        return mixed_radix_digits(ids, self.sizes)

    def combine_signature(self) -> tuple | None:
        return ("qr", self.operation, len(self.sizes))

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        if self.operation == "concat":
            return torch.cat(vectors, dim=-1)
        out = vectors[0]
        for v in vectors[1:]:
            out = out * v if self.operation == "mult" else out + v
        return out
