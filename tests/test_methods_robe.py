"""ROBE: forward and a fused SGD step against the paper's formula read straight off the flat
circular array (``e[c L + j] = g(x, c, j) * M[(h(x, c) + j) mod m]``), one shared array for every
table, Z > 1, wrapping reads, bad parameters, the rows knob and TOML round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from torchrec import KeyedJaggedTensor

import embtab
from embtab.config import LogicalTable
from embtab.hashing import hash64, hash_to_range, salt_of
from embtab.methods import METHODS, method_from_dict
from embtab.methods.robe import ROBE, SignedBlocks, probes_per_chunk, row_floats
from embtab.testing import assert_fused_step_matches_reference, random_kjt

DIM = 16
FEATURES = (
    embtab.FeatureSpec("tags", 500),
    embtab.FeatureSpec("tags_mean", 500, pooling="mean", table="tags"),
    embtab.FeatureSpec("item", 300),
    embtab.FeatureSpec("hist", 300, pooling="none", table="item"),
)


def naive_vectors(array: torch.Tensor, spec: ROBE, table: str, ids: torch.Tensor, dim: int = DIM) -> torch.Tensor:
    """Every float of every id read on its own from the flat array, with its own sign bit."""
    m, length = array.numel(), dim // spec.chunks
    rows = []
    for x in ids.tolist():
        one = torch.tensor([x])
        row = []
        for c in range(spec.chunks):
            offset = int(hash_to_range(one, m, salt_of(table, spec.salt, "offset", c)))
            for j in range(length):
                salt = salt_of(table, spec.salt, "offset", c) if j < 32 else salt_of(table, spec.salt, "sign", c, j // 32)
                word = int(hash64(one, salt)) & (2**64 - 1)
                sign = -1.0 if (word >> (63 - j % 32)) & 1 else 1.0
                row.append(sign * array[(offset + j) % m])
        rows.append(torch.stack(row))
    return torch.stack(rows) if rows else torch.zeros(0, dim)


@pytest.mark.parametrize("rows,chunks,dim", [(40, 1, 16), (1, 1, 16), (64, 4, 16), (64, 16, 16), (3, 16, 16), (50, 1, 72)])
def test_forward_and_fused_step_match_the_circular_array_formula(rows, chunks, dim):
    """rows=1: a 16-float array, as long as a vector, so every read wraps around; (3, 16): 12
    floats read one at a time; width 72: signs from three hash words."""
    spec = ROBE(rows=rows, chunks=chunks, salt=5)
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=dim, method=spec))
    assert list(tables.physical_tables) == ["robe"]  # one array for every table
    assert tables.physical_tables["robe"].rows == rows and tables.ebc is None
    kjt = random_kjt(FEATURES, batch=6, seed=2, max_len=4)
    reference = lambda w, t, ids: naive_vectors(w["robe"].reshape(-1), spec, t, ids, dim)  # noqa: E731
    assert_fused_step_matches_reference(tables, kjt, reference)


RUN_FEATURES = tuple(
    f
    for name, cardinality in (("a", 320), ("b", 400), ("c", 350))
    for f in (embtab.FeatureSpec(name, cardinality), embtab.FeatureSpec(f"{name}2", cardinality, table=name))
)


@pytest.mark.parametrize("rows,chunks", [(40, 1), (64, 4)])
def test_a_run_of_tables_on_one_array_reads_in_one_call_by_the_formula(rows, chunks):
    """Three pooled tables on the shared array combine in one `ROBERun` (each with its own
    salts); forward and fused step still follow the per-float formula."""
    spec = ROBE(rows=rows, chunks=chunks, salt=3)
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=RUN_FEATURES, dim=DIM, method=spec))
    assert tables.layout.group_of == {"a": "a", "b": "a", "c": "a"}
    kjt = random_kjt(RUN_FEATURES, batch=6, seed=4, max_len=4)
    reference = lambda w, t, ids: naive_vectors(w["robe"].reshape(-1), spec, t, ids)  # noqa: E731
    assert_fused_step_matches_reference(tables, kjt, reference)


def test_a_run_of_single_id_bags_reads_each_distinct_id_once_by_the_formula():
    """One id per bag in three one-feature tables, each id repeated many times: the run computes
    each distinct id once and puts its vector back in every bag (one gather), and forward and
    fused step still follow the per-float formula (every occurrence's gradient summed)."""
    features = tuple(embtab.FeatureSpec(name, 30) for name in ("a", "b", "c"))
    spec = ROBE(rows=40, salt=3)
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=features, dim=DIM, method=spec))
    assert tables.layout.group_of == {"a": "a", "b": "a", "c": "a"}
    ids = torch.randint(0, 12, (3 * 50,), generator=torch.Generator().manual_seed(4))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c"], values=ids, lengths=torch.ones(150, dtype=torch.int64))
    reference = lambda w, t, ids: naive_vectors(w["robe"].reshape(-1), spec, t, ids)  # noqa: E731
    assert_fused_step_matches_reference(tables, kjt, reference)


def test_reads_are_consecutive_signed_floats_from_a_hashed_offset():
    spec = ROBE(rows=1000)
    method = spec.build(LogicalTable("item", 300, DIM, FEATURES[2:], spec))
    assert [probes_per_chunk(16, 16), probes_per_chunk(16, 4), probes_per_chunk(4, 4), probes_per_chunk(1, 4)] == [2, 5, 2, 1]
    assert [row_floats(16), row_floats(2), row_floats(8)] == [16, 4, 8]
    array = torch.arange(16_000, dtype=torch.float32).reshape(1000, 16)
    ids = torch.arange(300)
    rows = method.remap_hashed(ids, [hash_to_range(ids, 16_000, s) for _, s in method.hashes()])
    assert rows.shape == (2, 300)  # two rows of 16 floats hold any 16 consecutive ones
    vectors = method.combine([array[r] for r in rows], ids)
    offsets = vectors.abs()[:, 0]
    assert torch.equal(vectors.abs(), (offsets.unsqueeze(1) + torch.arange(DIM)) % 16_000)
    assert len(set((offsets % 16).tolist())) > 8  # offsets at any float, not whole rows
    assert 0.4 < float((vectors < 0).float().mean()) < 0.6  # the sign hash flips about half


@pytest.mark.parametrize("shape", [(5, 3, 2, 32), (0, 3, 1, 32), (4, 1, 1, 8)])
def test_signed_blocks_equal_a_gather_and_its_gradient(shape):
    """The strided block read (and its overlapping-view gradient write) against `torch.gather`;
    the (5, 3, 2, 32) windows are a non-contiguous view, like a run with two features."""
    torch.manual_seed(0)
    length = shape[-1] // 2
    base = torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    starts = torch.randint(0, shape[-1] - length + 1, shape[:-1])
    signs = torch.where(torch.rand(*shape[:-1], length) < 0.5, -1.0, 1.0)
    upstream = torch.randn(*shape[:-1], length)
    results = []
    for read in (
        lambda w: SignedBlocks.apply(w, starts, signs),
        lambda w: torch.gather(w, -1, starts.unsqueeze(-1) + torch.arange(length)) * signs,
    ):
        windows = base.clone().requires_grad_()
        out = read(windows)
        (out * upstream).sum().backward()
        results.append((out.detach(), windows.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize(
    "spec,message",
    [
        (ROBE(rows=0), r"table 'item': rows must be an integer >= 1, got 0"),
        (ROBE(rows=8, chunks=3), r"table 'item': chunks=3 does not divide the width 16"),
        (ROBE(rows=8, chunks=0), r"table 'item': chunks must be an integer >= 1, got 0"),
        (ROBE(rows=8, table=""), r"table 'item': the shared array name must be non-empty"),
    ],
)
def test_bad_parameters_name_the_table_and_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.build(LogicalTable("item", 300, DIM, FEATURES[2:], spec))


def test_rows_knob_is_the_whole_array_and_round_trips_through_toml():
    spec = method_from_dict({"name": "robe", "rows": 10, "chunks": 2})
    assert METHODS["robe"] is ROBE and method_from_dict(spec.to_dict()) == spec
    assert ROBE.size_field == "rows" and ROBE.size_increasing
    for rows in (10, 1000):
        sized = dataclasses.replace(spec, rows=rows)
        tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=sized))
        assert tables.memory_bytes().total == rows * 8 * 4  # one array of 8-float rows, whatever the tables
