"""DHE: the dense hash code and the MLP against a per-id reference written from the paper's
formula, a training step's gradients, a table without physical rows next to fused ones, bad
parameters, the knob and TOML round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn import functional as F

import embtab
from embtab.config import LogicalTable
from embtab.hashing import hash64, hash_to_range, salt_of
from embtab.methods import METHODS, method_from_dict
from embtab.methods.dhe import DHE
from embtab.methods.full import FullTable
from embtab.testing import random_kjt, reference_pooled

DIM = 8
FEATURES = (
    embtab.FeatureSpec("tags", 500),
    embtab.FeatureSpec("tags_mean", 500, pooling="mean", table="tags"),
    embtab.FeatureSpec("item", 300),
    embtab.FeatureSpec("hist", 300, pooling="none", table="item"),
)
GAMMA = 0x9E3779B97F4A7C15


def naive_code(x: int, spec: DHE, table: str) -> torch.Tensor:
    """c_i = 2 h_i(x) / (m - 1) - 1, function i hashing (hash64(x) + i * G) mod 2**64, one at a time."""
    salt = salt_of(table, spec.salt, "dhe")
    first = int(hash64(torch.tensor([x]), salt)) & (2**64 - 1)
    code = []
    for i in range(spec.hashes):
        key = (first + i * GAMMA) & (2**64 - 1)
        key = key - 2**64 if key >= 2**63 else key
        bucket = int(hash_to_range(torch.tensor([key]), spec.buckets, salt))
        assert 0 <= bucket < spec.buckets
        code.append(2 * bucket / (spec.buckets - 1) - 1)
    return torch.tensor(code)


def naive_vectors(method, spec: DHE, table: str, ids: torch.Tensor) -> torch.Tensor:
    """Linear -> (batch norm, eval statistics) -> Mish per hidden layer, then Linear, per id."""
    layers = [m for m in method.mlp if isinstance(m, torch.nn.Linear)]
    norms = [m for m in method.mlp if isinstance(m, torch.nn.BatchNorm1d)]
    rows = []
    for x in ids.tolist():
        h = naive_code(x, spec, table)
        for j, linear in enumerate(layers[:-1]):
            h = F.linear(h, linear.weight, linear.bias)
            if norms:
                n = norms[j]
                h = (h - n.running_mean) / torch.sqrt(n.running_var + n.eps) * n.weight + n.bias
            h = h * torch.tanh(F.softplus(h))
        rows.append(F.linear(h, layers[-1].weight, layers[-1].bias))
    return torch.stack(rows) if rows else torch.zeros(0, DIM)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_forward_matches_the_hash_code_through_the_mlp(batch_norm):
    spec = DHE(hashes=24, hidden=16, layers=2, buckets=1000, batch_norm=batch_norm, salt=3)
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=spec)).eval()
    assert tables.physical_tables == {} and tables.collections() == []
    kjt = random_kjt(FEATURES, batch=5, seed=1, max_len=3)
    out = tables(kjt)
    vectors = lambda table, ids: naive_vectors(tables.methods[table], spec, table, ids)  # noqa: E731
    torch.testing.assert_close(out.pooled.values(), reference_pooled(FEATURES, kjt, vectors), atol=1e-5, rtol=1e-5)
    hist = kjt.to_dict()["hist"].values()
    torch.testing.assert_close(out.sequence["hist"].values(), vectors("item", hist), atol=1e-5, rtol=1e-5)


def test_codes_are_uniform_in_minus_one_to_one():
    method = DHE(hashes=256, buckets=10**6).build(LogicalTable("t", 10, DIM, FEATURES[:1], None))
    code = embtab.methods.dhe.encode(torch.arange(2000), 256, 10**6, method.salt)
    assert code.shape == (2000, 256) and float(code.min()) >= -1 and float(code.max()) <= 1
    assert abs(float(code.mean())) < 0.01 and abs(float(code.var()) - 1 / 3) < 0.01  # U(-1, 1)


def test_next_to_a_full_table_one_fused_step_matches_autograd_on_the_reference():
    spec = DHE(hashes=16, hidden=8, layers=1, batch_norm=False)
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(
        embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=spec, table_methods=(("item", FullTable()),))
    )
    reference = [p.detach().clone().requires_grad_() for p in tables.methods["tags"].mlp.parameters()]
    dmp = embtab.fuse(tables, embtab.SparseOptimizer("sgd", lr=0.1))
    kjt = random_kjt(FEATURES, batch=6, seed=2, max_len=3)
    out = dmp(kjt).pooled.values()[:, : 2 * DIM]  # tags and tags_mean
    out.square().sum().backward()

    def vectors(table: str, ids: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = reference
        rows = [naive_code(x, spec, table) for x in ids.tolist()]
        h = F.linear(torch.stack(rows), w1, b1) if rows else torch.zeros(0, 8)
        return F.linear(h * torch.tanh(F.softplus(h)), w2, b2)

    expected = reference_pooled(FEATURES[:2], kjt, vectors)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    expected.square().sum().backward()
    ours = [p.grad for n, p in dmp.named_parameters() if "methods.tags.mlp" in n]
    for got, want in zip(ours, reference):
        torch.testing.assert_close(got, want.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "spec,message",
    [
        (DHE(hashes=0), r"table 'item': hashes must be an integer >= 1, got 0"),
        (DHE(hidden=0), r"table 'item': hidden must be an integer >= 1, got 0"),
        (DHE(layers=0), r"table 'item': layers must be an integer >= 1, got 0"),
        (DHE(buckets=1), r"table 'item': buckets must be an integer >= 2, got 1"),
    ],
)
def test_bad_parameters_name_the_table_and_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.build(LogicalTable("item", 300, DIM, FEATURES[2:], spec))


def test_the_knob_grows_bytes_and_round_trips_through_toml():
    spec = method_from_dict({"name": "dhe", "hashes": 32, "hidden": 16, "layers": 2})
    assert METHODS["dhe"] is DHE and method_from_dict(spec.to_dict()) == spec
    assert DHE.size_field == "hashes" and DHE.size_increasing
    specs = [embtab.EmbeddingSpec(features=FEATURES, dim=DIM, method=dataclasses.replace(spec, hashes=k)) for k in (32, 33, 64)]
    sizes = [embtab.EmbeddingTables(s).memory_bytes().total for s in specs]
    assert sizes[1] - sizes[0] == 2 * 16 * 4  # two tables, one hidden layer's width of floats per function
    assert sizes == sorted(sizes)
