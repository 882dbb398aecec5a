"""TT-Rec: mixed-radix digits, forward and a fused SGD step against the paper's chained product
written per id, the Gaussian core init's variance, tables kept full where TT would not shrink
them, bad parameters, the rank knob and TOML round trip."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtab
from embtab.config import LogicalTable
from embtab.methods import METHODS, method_from_dict
from embtab.methods.full import FullTableMethod
from embtab.methods.tt_rec import TTRec, TTRecMethod, dim_factors, init_std
from embtab.testing import assert_fused_step_matches_reference, random_kjt

CARD = 1000
DIM = 16
FEATURES = (
    embtab.FeatureSpec("tags", CARD),
    embtab.FeatureSpec("tags_mean", CARD, pooling="mean", table="tags"),
    embtab.FeatureSpec("item", 900),
    embtab.FeatureSpec("hist", 900, pooling="none", table="item"),
)


def naive_vectors(weights: dict[str, torch.Tensor], table: str, ids: torch.Tensor, rank: int) -> torch.Tensor:
    """e[j1, j2, j3] = sum_ab G1[i1][j1, a] G2[i2][a, j2, b] G3[i3][b, j3], one id at a time."""
    cores = [weights[f"{table}@tt{j}"] for j in range(3)]
    n1, n2 = cores[0].shape[0], cores[1].shape[0]
    d1, d2, d3 = dim_factors(DIM)
    rows = []
    for i in ids.tolist():
        i1, i2, i3 = i % n1, (i // n1) % n2, i // (n1 * n2)
        g1 = cores[0][i1, : d1 * rank].reshape(d1, rank)
        g2 = cores[1][i2, : rank * d2 * rank].reshape(rank, d2, rank)
        g3 = cores[2][i3, : rank * d3].reshape(rank, d3)
        rows.append(torch.einsum("ia,ajb,bk->ijk", g1, g2, g3).reshape(-1))
    return torch.stack(rows) if rows else torch.zeros(0, DIM)


def test_digits_cover_every_id_once_and_widths_are_padded():
    method = TTRec(rank=3).build(LogicalTable("item", CARD, DIM, FEATURES[2:], None))
    assert isinstance(method, TTRecMethod)
    assert method.sizes == (10, 10, 10) and dim_factors(16) == (2, 2, 4) and dim_factors(64) == (4, 4, 4)
    assert [t.dim for t in method.physical_tables] == [8, 20, 12]  # 6, 18, 12 up to multiples of 4
    digits = method.remap(torch.arange(CARD))
    assert torch.unique(digits.t(), dim=0).shape[0] == CARD
    assert method.max_id == CARD


@pytest.mark.parametrize("rank", [1, 3, 4])
def test_forward_and_fused_step_match_the_chained_product(rank):
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=TTRec(rank=rank)))
    assert tables.ebc is None  # the product is combined per id, then pooled
    kjt = random_kjt(FEATURES, batch=6, seed=2, max_len=4)
    assert_fused_step_matches_reference(tables, kjt, lambda w, t, ids: naive_vectors(w, t, ids, rank))


@pytest.mark.parametrize("ids", [2000, 12], ids=["every_pair_in_one_product", "the_pairs_used"])
def test_distinct_core_rows_combine_to_the_per_id_chain_and_its_gradient(ids):
    """`combine_rows` (the first two cores' products per pair of distinct rows, both ways of
    choosing the pairs) against `combine` of the rows expanded per id."""
    method = TTRec(rank=3).build(LogicalTable("item", CARD, DIM, FEATURES[2:], None))
    torch.manual_seed(0)
    digits = method.remap(torch.randint(0, CARD, (ids,)))
    pairs = [torch.unique(d, return_inverse=True) for d in digits]
    index = [i for _, i in pairs]
    results = []
    for distinct in (True, False):
        torch.manual_seed(1)
        rows = [torch.randn(len(u), t.dim, requires_grad=True) for (u, _), t in zip(pairs, method.physical_tables)]
        out = method.combine_rows(rows, index) if distinct else method.combine([r[i] for r, i in zip(rows, index)])
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        results.append((out.detach(), [r.grad for r in rows]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for ours, expanded in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(ours, expanded, rtol=1e-4, atol=1e-4)  # sums over 2,000 ids


def test_gaussian_cores_give_the_full_tables_variance():
    n, rank = 10**6, 4
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(
        embtab.EmbeddingSpec(features=(embtab.FeatureSpec("x", n, pooling="none"),), dim=DIM, method=TTRec(rank))
    )
    ids = torch.randint(0, n, (20_000,))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["x"], values=ids, lengths=torch.ones_like(ids))
    with torch.no_grad():
        vectors = tables(kjt).sequence["x"].values()
    assert math.isclose(float(vectors.var()), 1 / (3 * n), rel_tol=0.25)
    assert math.isclose(init_std(n, rank), (3 * n * rank**2) ** (-1 / 6))


def test_tables_tt_would_not_shrink_stay_full():
    small = LogicalTable("small", 30, DIM, FEATURES[:1], None)
    assert isinstance(TTRec(rank=8).build(small), FullTableMethod)
    assert isinstance(TTRec(rank=1).build(small), TTRecMethod)  # 3 x 4 + 4 x 4 + 3 x 4 floats < 30 x 16


@pytest.mark.parametrize(
    "spec,message",
    [
        (TTRec(rank=0), r"table 'item': rank must be an integer >= 1, got 0"),
        (
            TTRec(rank=2, dim_factors=(2, 2, 2)),
            r"table 'item': dim_factors must be 3 positive integers with product 16 \(the width\), got \(2, 2, 2\)",
        ),
        (TTRec(rank=2, dim_factors=(4, 4)), r"dim_factors must be 3 positive integers"),
    ],
)
def test_bad_parameters_name_the_table_and_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.build(LogicalTable("item", CARD, DIM, FEATURES[2:], spec))


def test_rank_knob_grows_bytes_and_round_trips_through_toml():
    spec = method_from_dict({"name": "tt_rec", "rank": 2, "dim_factors": [4, 1, 4]})
    assert METHODS["tt_rec"] is TTRec and spec.dim_factors == (4, 1, 4)
    assert method_from_dict(spec.to_dict()) == spec
    assert TTRec.size_field == "rank" and TTRec.size_increasing
    sizes = []
    for rank in (1, 2, 4, 8):
        sized = dataclasses.replace(spec, rank=rank)
        tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=sized))
        sizes.append(tables.memory_bytes().total)
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
