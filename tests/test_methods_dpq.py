"""DPQ and MGQE: codes against a per-id nearest-codeword search, forward and a fused SGD step
against the paper's straight-through output ``q + sg(v - q)`` with the codebook term
``beta ||v - sg(q)||^2`` written out with autograd, MGQE's frequency groups, the export's codes and
bytes, bad parameters, TOML round trips; a run of tables snapped in one call (`DPQMethod.grouped`)
against the formula and against each table alone; ties."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtab
from embtab.budget import solve_budget
from embtab.config import LogicalTable
from embtab.methods import SEARCH_METHODS, method_from_dict
from embtab.methods import dpq
from embtab.methods.dpq import DPQ
from embtab.methods.mgqe import MGQE
from embtab.shard import physical_weights
from embtab.testing import assert_fused_step_matches_reference, random_kjt

DIM = 16
FEATURES = (
    embtab.FeatureSpec("tags", 60),
    embtab.FeatureSpec("tags_mean", 60, pooling="mean", table="tags"),
    embtab.FeatureSpec("item", 40),
    embtab.FeatureSpec("hist", 40, pooling="none", table="item"),
)
HOT = (1, 5, 7, 30)


def nearest(query: torch.Tensor, codebook: torch.Tensor, allowed: int) -> list[int]:
    """Per part, the index of the closest of the first `allowed` codewords (plain distances)."""
    parts = query.reshape(codebook.shape[0], -1)
    return [int(((codebook[p, :allowed] - parts[p]) ** 2).sum(1).argmin()) for p in range(len(parts))]


def naive_vectors(weights, codebooks, spec, table: str, ids: torch.Tensor) -> torch.Tensor:
    """q + (v - q).detach() per id, and beta * ||v - q.detach()||^2 added to the codebook's grad."""
    codebook = codebooks[table]
    rows = []
    for i in ids.tolist():
        q = weights[table][i]
        allowed = spec.rare_codewords if isinstance(spec, MGQE) and i not in spec.hot_ids else spec.codewords
        codes = nearest(q.detach(), codebook.detach(), allowed)
        v = torch.cat([codebook[p, c] for p, c in enumerate(codes)])
        term = spec.beta * ((v - q.detach()) ** 2).sum()
        term.backward(retain_graph=True)  # the codebook term of this looked-up id
        rows.append(q + (v - q).detach())
    return torch.stack(rows) if rows else torch.zeros(0, DIM)


@pytest.mark.parametrize(
    "spec",
    [DPQ(parts=8, codewords=4, beta=0.5), DPQ(parts=2, codewords=16), MGQE(parts=4, codewords=8, rare_codewords=2, hot_ids=HOT)],
)
def test_forward_and_fused_step_match_the_straight_through_formula(spec):
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=spec))
    assert tables.ebc is None  # snapping is per id: pooled after the combine
    assert_step_and_codebook_gradients_match_the_formula(tables, spec, random_kjt(FEATURES, batch=6, seed=2, max_len=4))


def assert_step_and_codebook_gradients_match_the_formula(tables, spec, kjt) -> None:
    """Forward and fused step follow `naive_vectors`, and every table's codebook gradient (non-zero)
    equals the formula's."""
    codebooks = {name: m.codebook.detach().clone().requires_grad_() for name, m in tables.methods.items()}
    dmp, _ = assert_fused_step_matches_reference(
        tables, kjt, lambda w, t, ids: naive_vectors(w, codebooks, spec, t, ids)
    )
    for name, codebook in codebooks.items():
        ours = next(p.grad for key, p in dmp.named_parameters() if key.endswith(f"methods.{name}.codebook"))
        assert codebook.grad is not None and codebook.grad.abs().sum() > 0
        torch.testing.assert_close(ours, codebook.grad, atol=1e-6, rtol=1e-5)


def test_codes_are_the_nearest_codewords_and_rare_ids_use_the_prefix(monkeypatch):
    monkeypatch.setattr(dpq, "SEARCH_BLOCK", 7)  # the search runs in several blocks of ids
    spec = MGQE(parts=4, codewords=8, rare_codewords=2, hot_ids=HOT)
    method = spec.build(LogicalTable("item", 40, DIM, FEATURES[2:], spec))
    torch.manual_seed(1)
    with torch.no_grad():
        method.codebook.normal_()
    queries = torch.randn(40, DIM)
    codes = method.codes(queries)
    for i in range(40):
        assert codes[i].tolist() == nearest(queries[i], method.codebook.detach(), 8 if i in HOT else 2)
    rare = [i for i in range(40) if i not in HOT]
    assert int(codes[rare].max()) < 2 and int(codes[list(HOT)].max()) >= 2
    assert method.export_bytes() == (4 * (4 * 3 + 36 * 1) + 7) // 8 + 4 * 8 * 4 * 4 + 4 * 8
    plain = DPQ(parts=8, codewords=32).build(LogicalTable("item", 40, DIM, FEATURES[2:], None))
    assert plain.export_bytes() == 40 * 8 * 5 // 8 + 8 * 32 * 2 * 4  # 5-bit codes + codebook


def test_the_codebook_term_skips_padded_slots_and_scales_with_beta():
    """Two features of different bag counts pad the per-id block; only real ids pull codewords."""
    features = (embtab.FeatureSpec("a", 30), embtab.FeatureSpec("b", 30, table="a"))
    grads = []
    for beta in (1.0, 3.0):
        torch.manual_seed(0)
        method = DPQ(parts=4, codewords=4, beta=beta)
        tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=features, dim=DIM, method=method))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["a", "b"], values=torch.tensor([3, 4, 5, 6]), lengths=torch.tensor([1, 1, 1, 1, 0, 0])
        )  # a: 3 ids, b: 1 id, so b's column of the per-id block has 2 padded slots
        tables(kjt).pooled.values().sum().backward()
        grads.append(tables.methods["a"].codebook.grad.clone())
    torch.testing.assert_close(grads[1], 3 * grads[0])
    weights = physical_weights(tables)["a"]
    method = tables.methods["a"]
    codes = method.codes(weights[[3, 4, 5, 6]])
    expected = torch.zeros_like(grads[0])
    for row, code in zip(weights[[3, 4, 5, 6]], codes):
        for p, c in enumerate(code.tolist()):
            expected[p, c] += 2 * (method.codebook[p, c] - row.reshape(4, 4)[p]).detach()
    torch.testing.assert_close(grads[0], expected)


@pytest.mark.parametrize(
    "spec,message",
    [
        (DPQ(parts=3), r"table 'item': parts=3 does not divide the width 16"),
        (DPQ(codewords=0), r"table 'item': codewords must be an integer >= 1, got 0"),
        (DPQ(beta=-1.0), r"table 'item': beta must be >= 0, got -1.0"),
        (MGQE(rare_codewords=300), r"table 'item': rare_codewords must be <= codewords=256, got 300"),
        (MGQE(hot_ids=(40,)), r"table 'item': hot id 40 is out of range; expected 0 <= id < 40"),
    ],
)
def test_bad_parameters_name_the_table_and_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.build(LogicalTable("item", 40, DIM, FEATURES[2:], spec))


def test_registered_and_round_trip_through_toml():
    for data in ({"name": "dpq", "parts": 4, "codewords": 16}, {"name": "mgqe", "hot_ids": [3, 1]}):
        spec = method_from_dict(data)
        assert SEARCH_METHODS[data["name"]] is type(spec) and method_from_dict(spec.to_dict()) == spec


def test_a_budget_below_the_training_size_is_refused_with_that_size():
    """DPQ trains the full query table: its bytes are fixed (full table + codebook)."""
    spec = embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=DPQ(parts=4, codewords=8))
    optimizer = embtab.SparseOptimizer("rowwise_adagrad")
    training = embtab.EmbeddingTables(spec).memory_bytes(optimizer).total
    assert training == (60 + 40) * (16 * 4 + 4) + 2 * 4 * 8 * 4 * 4
    with pytest.raises(ValueError, match=rf"below the 'dpq' configuration's fixed {training} bytes"):
        solve_budget(spec, training // 4, optimizer)


def _run_of_tables(spec_of, cardinalities):
    """Methods for tables of `cardinalities` (spec_of(i) builds table i's spec), random codebooks."""
    torch.manual_seed(3)
    methods = []
    for i, cardinality in enumerate(cardinalities):
        spec = spec_of(i)
        method = spec.build(LogicalTable(f"t{i}", cardinality, DIM, FEATURES[2:], spec))
        with torch.no_grad():
            method.codebook.normal_()
        methods.append(method)
    return methods


def _run_inputs(cardinalities, rows=7, features=2):
    """Ids ``[rows, tables, features]`` (some -1: padded) and their queries, one table row per id."""
    torch.manual_seed(4)
    tables = [torch.randn(c, DIM) for c in cardinalities]
    ids = torch.stack([torch.randint(-1, c, (rows, features)) for c in cardinalities], 1)
    ids[:2, 0] = 2  # repeated ids
    queries = torch.stack([tables[t][ids[:, t].clamp(min=0)] for t in range(len(tables))], 1)
    return ids, queries


RUNS = [
    pytest.param(lambda i: DPQ(parts=8, codewords=4, beta=0.5), (10, 13, 9), id="dpq"),
    pytest.param(
        lambda i: MGQE(parts=4, codewords=8, rare_codewords=3, hot_ids=((1, 2, 7), (), (0, 2, 3, 4))[i]),
        (10, 13, 9),
        id="mgqe, each table its own hot ids",
    ),
    pytest.param(lambda i: MGQE(parts=4, codewords=8, rare_codewords=2), (10, 13, 9), id="mgqe, no hot ids"),
]


@pytest.mark.parametrize("spec_of,cardinalities", RUNS)
def test_a_run_of_tables_snaps_each_id_by_the_formula_with_its_own_codebook(spec_of, cardinalities):
    """One call for several tables: every valid slot's output is its nearest allowed codewords of
    its own table, its query's gradient passes straight through, and each table's codebook gets
    ``beta * ||v - sg(q)||^2`` summed over that table's slots only."""
    methods = _run_of_tables(spec_of, cardinalities)
    ids, queries = _run_inputs(cardinalities)
    queries.requires_grad_()
    upstream = torch.randn(queries.shape)
    out = methods[0].grouped(methods).combine(queries.unsqueeze(2), ids)
    (out * upstream).sum().backward()
    torch.testing.assert_close(queries.grad, upstream)
    naive_books = [m.codebook.detach().clone().requires_grad_() for m in methods]
    for t, (method, book) in enumerate(zip(methods, naive_books)):
        spec = spec_of(t)
        for r, f in (ids[:, t] >= 0).nonzero().tolist():
            i, q = int(ids[r, t, f]), queries[r, t, f].detach()
            allowed = spec.rare_codewords if isinstance(spec, MGQE) and i not in spec.hot_ids else spec.codewords
            codes = nearest(q, book.detach(), allowed)
            v = torch.cat([book[p, c] for p, c in enumerate(codes)])
            (spec.beta * ((v - q) ** 2).sum()).backward()
            torch.testing.assert_close(out[r, t, f], v.detach())
        torch.testing.assert_close(method.codebook.grad, book.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec_of,cardinalities", RUNS)
def test_a_run_of_tables_equals_each_table_combined_alone(spec_of, cardinalities, monkeypatch):
    monkeypatch.setattr(dpq, "SEARCH_BLOCK", 40)  # several blocks per table
    methods = _run_of_tables(spec_of, cardinalities)
    ids, queries = _run_inputs(cardinalities)
    upstream = torch.randn(queries.shape)
    results = []
    for grouped in (True, False):
        for m in methods:
            m.codebook.grad = None
        leaf = queries.clone().requires_grad_()
        if grouped:
            out = methods[0].grouped(methods).combine(leaf.unsqueeze(2), ids)
        else:
            out = torch.stack([m.combine([leaf[:, t]], ids[:, t]) for t, m in enumerate(methods)], 1)
        (out * upstream).sum().backward()
        results.append((out.detach(), leaf.grad, [m.codebook.grad.clone() for m in methods]))
    (out_run, grad_run, books_run), (out_alone, grad_alone, books_alone) = results
    valid = ids >= 0
    assert torch.equal(out_run[valid], out_alone[valid])
    assert torch.equal(grad_run, grad_alone)
    for run_grad, alone_grad in zip(books_run, books_alone):
        torch.testing.assert_close(run_grad, alone_grad)


def test_exact_ties_go_to_the_first_nearest_codeword():
    spec = DPQ(parts=8, codewords=4)
    method = spec.build(LogicalTable("item", 40, DIM, FEATURES[2:], spec))
    with torch.no_grad():
        method.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    queries = torch.tensor([[0.9, 0.1] * 8, [0.2, 0.8] * 8, [0.5, 0.5] * 8])  # nearer 0, nearer 1, tied
    assert method.codes(queries).tolist() == [[0] * 8, [1] * 8, [0] * 8]


@pytest.mark.parametrize("width", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_wide_row_gathers_and_sums_equal_index_select_and_index_add(width, dtype):
    g = torch.Generator().manual_seed(width)
    table = torch.randn(9, width, generator=g).to(dtype)
    index = torch.randint(0, 9, (40,), generator=g)
    rows = torch.randn(40, width, generator=g).to(dtype)
    assert torch.equal(dpq.gather_rows(table, index), table.index_select(0, index))
    expected = table.clone().index_add_(0, index, rows)
    assert torch.equal(dpq.add_rows(table.clone(), index, rows), expected)


RUN_FEATURES = tuple(
    f for name, cardinality in (("a", 32), ("b", 40), ("c", 35))
    for f in (embtab.FeatureSpec(name, cardinality), embtab.FeatureSpec(f"{name}2", cardinality, table=name))
)


@pytest.mark.parametrize(
    "spec", [DPQ(parts=8, codewords=4, beta=0.5), MGQE(parts=4, codewords=8, rare_codewords=2, hot_ids=HOT)]
)
def test_like_tables_snap_in_one_run_by_the_formula(spec):
    """Three DPQ tables of one configuration are combined in one call (`DPQMethod.grouped`);
    forward, fused step and codebook gradients still follow the per-id formula."""
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=RUN_FEATURES, dim=DIM, method=spec))
    assert set(tables.layout.group_of.values()) == {"a"}  # one run: a, b, c
    assert_step_and_codebook_gradients_match_the_formula(tables, spec, random_kjt(RUN_FEATURES, batch=6, seed=2, max_len=4))
