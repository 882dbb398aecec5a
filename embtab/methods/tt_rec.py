"""TT-Rec: tensor-train compressed tables (Yin et al., MLSys 2021, arXiv 2101.11714).

A table of ``n`` ids of width ``d`` is a 3-core tensor train. The ids get three mixed-radix digits
``(i1, i2, i3)`` with ``n1 * n2 * n3 >= n`` (QR's partition code,
`embtab.methods.qr.mixed_radix_digits`: ``i1 = i mod n1``, ``i2 = floor(i / n1) mod n2``,
``i3 = floor(i / (n1 n2))``, near-equal digits ``n_j ~ n ** (1/3)``), the width factors as
``d = d1 * d2 * d3``, and id ``i``'s vector is the chained product of three cores

    e[j1, j2, j3] = sum_{a < r, b < r} G1[i1][j1, a] * G2[i2][a, j2, b] * G3[i3][b, j3]

flattened row-major (``j1 * d2 * d3 + j2 * d3 + j3``), rank ``r`` the budget knob. Each core is a
physical table looked up by its digit: G1 ``n1 x (d1 r)``, G2 ``n2 x (r d2 r)``, G3 ``n3 x (r d3)``
(widths padded up to a multiple of 4 for fbgemm; the padding columns are never read). A batch
reads only a few distinct rows of each core (at most ``n_j ~ n ** (1/3)``), so the method looks
each of them up once (`distinct_rows`) and `combine_rows` multiplies ``G1[i1] G2[i2]`` once per
pair of distinct first and middle rows, then by ``G3[i3]`` once per distinct id; `combine` is
the same chain on rows looked up per id (the plain form, which `combine_rows` must equal). The
product is not linear in a bag, so pooled features are combined per id, then pooled
(``pooling_commutes = False``). Parameters
``r (n1 d1 + r n2 d2 + n3 d3)`` (before padding); a table whose cores would not be smaller than
its full ``n x d`` table stays full, as in the paper and the benchmark (tables too small to gain).

Initialization (the paper's "sampled Gaussian"): every core element is drawn from N(0, s**2) with
``s = (3 n r**2) ** (-1/6)``, so each element of the product, a sum of ``r**2`` products of three
independent draws, has the variance ``r**2 s**6 = 1 / (3 n)`` of the full table's default
U(-sqrt(1/n), sqrt(1/n)) (uniform cores would give a product far from it).

Not here: the paper's cache of hot rows (a full-precision cache of the most frequent ids), and
FBGEMM's fused TT kernel (GPU only; this runs the three core lookups in the one fused torchrec
lookup and the products in torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from embtab.config import LogicalTable
from embtab.methods.base import PhysicalTable, SizedSpec, TableMethod
from embtab.checks import check_int
from embtab.methods.full import FullTable
from embtab.methods.qr import ceil_root, mixed_radix_digits, partition_sizes
from embtab.registry import MethodKind, register_method

CORES = 3


@register_method(MethodKind.COMPRESSION)
@dataclass(frozen=True)
class TTRec(SizedSpec):
    """A 3-core tensor train per table (tables it would not shrink stay full).

    Args:
        rank: the TT rank r (bytes grow with it, about ``r**2 * n**(1/3)``: the budget knob).
        dim_factors: ``(d1, d2, d3)`` with product the table's width; default the near-equal
            factors of the width in ascending order (16 -> (2, 2, 4), 64 -> (4, 4, 4)).
    """

    name = "tt_rec"
    size_field: ClassVar[str] = "rank"
    size_increasing: ClassVar[bool] = True

    rank: int
    dim_factors: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.dim_factors is not None:
            object.__setattr__(self, "dim_factors", tuple(self.dim_factors))

    def build(self, table: LogicalTable) -> TableMethod:
        check_int(table.name, "rank", self.rank, 1)
        factors = self.factors(table)
        sizes = partition_sizes(table.cardinality, ceil_root(table.cardinality, CORES), CORES)
        if core_floats(sizes, factors, self.rank) >= table.cardinality * table.dim:
            return FullTable().build(table)
        return TTRecMethod(table, sizes, factors, self.rank)

    def factors(self, table: LogicalTable) -> tuple[int, int, int]:
        """The width factors ``(d1, d2, d3)``, checked against the table's width."""
        if self.dim_factors is None:
            return dim_factors(table.dim)
        factors = self.dim_factors
        valid = len(factors) == CORES and all(
            isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in factors
        )
        if not valid or factors[0] * factors[1] * factors[2] != table.dim:
            raise ValueError(
                f"table {table.name!r}: dim_factors must be 3 positive integers with product "
                f"{table.dim} (the width), got {factors!r}"
            )
        return factors  # type: ignore[return-value]


def dim_factors(dim: int) -> tuple[int, int, int]:
    """Near-equal factors ``d1 <= d2 <= d3`` of `dim`: d1 the largest divisor <= dim ** (1/3),
    d2 the largest divisor of the rest <= its square root."""
    d1 = max(f for f in range(1, dim + 1) if dim % f == 0 and f**3 <= dim)
    rest = dim // d1
    d2 = max(f for f in range(1, rest + 1) if rest % f == 0 and f * f <= rest)
    return d1, d2, rest // d2


def core_widths(factors: tuple[int, int, int], rank: int) -> tuple[int, int, int]:
    """Unpadded widths of the three cores: ``d1 r``, ``r d2 r``, ``r d3``."""
    d1, d2, d3 = factors
    return d1 * rank, rank * d2 * rank, rank * d3


def _round_up4(n: int) -> int:
    return -(-n // 4) * 4


def core_floats(sizes: tuple[int, ...], factors: tuple[int, int, int], rank: int) -> int:
    """Floats the three (padded) core tables hold."""
    return sum(n * _round_up4(w) for n, w in zip(sizes, core_widths(factors, rank)))


def init_std(cardinality: int, rank: int) -> float:
    """The cores' standard deviation: the product then has the full table's variance 1 / (3 n)."""
    return (3 * cardinality * rank * rank) ** (-1 / 6)


class TTRecMethod(TableMethod):
    pooling_commutes = False
    distinct_rows = True

    def __init__(
        self, table: LogicalTable, sizes: tuple[int, ...], factors: tuple[int, int, int], rank: int
    ) -> None:
        super().__init__(table)
        self.sizes, self.factors, self.rank = sizes, factors, rank
        self.widths = core_widths(factors, rank)
        std = init_std(table.cardinality, rank)
        self.physical_tables = tuple(
            PhysicalTable(f"{table.name}@tt{j}", rows, _round_up4(width), init_std=std)
            for j, (rows, width) in enumerate(zip(sizes, self.widths))
        )

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        return mixed_radix_digits(ids, self.sizes)

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        d1, d2, d3 = self.factors
        r = self.rank
        lead = vectors[0].shape[:-1]
        first, middle, last = (v[..., :w] for v, w in zip(vectors, self.widths))
        out = torch.matmul(first.reshape(*lead, d1, r), middle.reshape(*lead, r, d2 * r))
        out = torch.matmul(out.reshape(*lead, d1 * d2, r), last.reshape(*lead, r, d3))
        return out.reshape(*lead, self.table.dim)

    def combine_rows(self, rows: list[torch.Tensor], index: list[torch.Tensor]) -> torch.Tensor:
        """The chain from each core's distinct rows: the products ``G1[i1] G2[i2]`` once per pair
        of first and middle rows (`_first_products`), then one ``[d1 d2, r] x [r, d3]`` product
        per distinct id (its pair and last row), expanded to every id."""
        d3, r = self.factors[2], self.rank
        first, middle, last = (v[:, :w] for v, w in zip(rows, self.widths))
        products, pair = self._first_products(first, middle, index[0], index[1])
        pairs, lasts, of_id = distinct_pairs(pair, index[2], last.shape[0])
        out = torch.bmm(products.index_select(0, pairs), last.reshape(-1, r, d3).index_select(0, lasts))
        return out.reshape(-1, self.table.dim).index_select(0, of_id)

    def _first_products(
        self, first: torch.Tensor, middle: torch.Tensor, i1: torch.Tensor, i2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``G1[a] G2[b]`` as ``[pairs, d1 d2, r]`` and each id's pair: of every pair of distinct
        first and middle rows in one matrix product when there are at most twice as many pairs
        as ids (a batch of a table with small cores), else of the pairs the ids use."""
        d1, d2, _ = self.factors
        r, u1, u2 = self.rank, first.shape[0], middle.shape[0]
        if u1 * u2 <= 2 * i1.numel():
            columns = middle.reshape(u2, r, d2 * r).transpose(0, 1).reshape(r, u2 * d2 * r)
            products = (first.reshape(u1 * d1, r) @ columns).reshape(u1, d1, u2, d2 * r)
            return products.transpose(1, 2).reshape(u1 * u2, d1 * d2, r), i1 * u2 + i2
        firsts, middles, pair = distinct_pairs(i1, i2, u2)
        a = first.reshape(u1, d1, r).index_select(0, firsts)
        b = middle.reshape(u2, r, d2 * r).index_select(0, middles)
        return torch.bmm(a, b).reshape(-1, d1 * d2, r), pair


def distinct_pairs(a: torch.Tensor, b: torch.Tensor, b_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct pairs ``(a[i], b[i])`` (``b`` below `b_size`) as their first and second
    members, and each i's pair among them."""
    pairs, of_pair = torch.unique(a * b_size + b, return_inverse=True)
    return torch.div(pairs, b_size, rounding_mode="floor"), pairs % b_size, of_pair
