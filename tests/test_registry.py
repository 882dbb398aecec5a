"""The method registry: kinds, derived views, and a method added in one file (this one)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torchrec import KeyedJaggedTensor

import embtab
from embtab.budget import solve_budget, spec_bytes
from embtab.config import LogicalTable
from embtab.methods import METHODS, PLACEMENT_METHODS, SEARCH_METHODS
from embtab.methods.base import LearnedSizeSpec, PhysicalTable, SizedSpec, TableMethod
from embtab.registry import (
    MethodKind,
    kind_of,
    method_class,
    method_from_dict,
    methods_of_kind,
    register_method,
    unregister_method,
)

FEATURES = (embtab.FeatureSpec("user", 1_000), embtab.FeatureSpec("item", 400))


@dataclass(frozen=True)
class Modulo(SizedSpec):
    """A toy method: id mod `rows` (no hash), one table of `rows` rows."""

    name = "toy_modulo"
    size_field = "rows"
    size_increasing = True

    rows: int = 8

    def build(self, table: LogicalTable) -> "ModuloMethod":
        return ModuloMethod(table, self.rows)


class ModuloMethod(TableMethod):
    def __init__(self, table: LogicalTable, rows: int) -> None:
        super().__init__(table)
        self.rows = min(rows, table.cardinality)
        self.physical_tables = (PhysicalTable(table.name, self.rows, table.dim),)

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids % self.rows).unsqueeze(0)

    def combine(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return vectors[0]


@pytest.fixture
def toy():
    register_method(MethodKind.COMPRESSION)(Modulo)
    yield Modulo
    unregister_method(Modulo.name)


def test_views_are_the_registry_by_kind():
    assert METHODS == methods_of_kind(MethodKind.COMPRESSION)
    assert SEARCH_METHODS == methods_of_kind(
        MethodKind.LEARNED_SIZE, MethodKind.SEARCH_RESULT, MethodKind.EXPORT_COMPRESSED
    )
    assert PLACEMENT_METHODS == methods_of_kind("placement")
    assert list(METHODS) == [
        "full", "hashing_trick", "multi_hash", "qr", "multiplex", "managed_collision", "tt_rec", "robe", "dhe"
    ]
    assert kind_of("pep") is MethodKind.LEARNED_SIZE and kind_of("offloaded") is MethodKind.PLACEMENT
    learned = {n for n, c in methods_of_kind().items() if issubclass(c, LearnedSizeSpec)}
    assert learned == {"optembed", "pep", "dnis", "deeplight", "autosrh", "autodim"} == set(methods_of_kind(MethodKind.LEARNED_SIZE))


def test_unknown_names_and_duplicates_are_rejected():
    with pytest.raises(ValueError, match="unknown embedding method 'nope'; expected one of"):
        method_class("nope")
    with pytest.raises(ValueError, match="'full' is already registered by FullTable"):
        register_method(MethodKind.COMPRESSION)(type("Other", (embtab.MethodSpec,), {"name": "full"}))
    with pytest.raises(ValueError, match="kind"):
        register_method("compresion")
    with pytest.raises(ValueError, match="no registry key"):
        register_method(MethodKind.COMPRESSION)(type("Nameless", (embtab.MethodSpec,), {}))


def test_a_method_defined_in_one_file_works_through_tables_config_and_budget(toy):
    spec = embtab.EmbeddingSpec.from_dict(
        {"features": [{"name": f.name, "cardinality": f.cardinality} for f in FEATURES], "dim": 4,
         "method": {"name": "toy_modulo", "rows": 16}}
    )
    assert spec.method == Modulo(rows=16) and method_from_dict(spec.method.to_dict()) == spec.method
    torch.manual_seed(0)
    tables = embtab.EmbeddingTables(spec)
    ids = torch.tensor([3, 19, 35, 7])  # user 3 and 19 share row 3; item 35 reads row 3 of its own table
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["user", "item"], values=ids, lengths=torch.ones(4, dtype=torch.int64))
    out = tables(kjt).pooled.values()
    user, item = tables.ebc.embedding_bags["user"].weight, tables.ebc.embedding_bags["item"].weight
    torch.testing.assert_close(out, torch.cat([user[[3, 3]], item[[3, 7]]], 1))
    optimizer = embtab.SparseOptimizer("rowwise_adagrad")
    fit = solve_budget(spec, 20_000, optimizer)
    assert type(fit.method) is Modulo and 0.9 * 20_000 <= fit.bytes <= 20_000
    assert fit.bytes == spec_bytes(fit.spec, optimizer) == tables_bytes(fit.spec, optimizer)


def tables_bytes(spec: embtab.EmbeddingSpec, optimizer: embtab.SparseOptimizer) -> int:
    """Weights and row-wise state of every table at its own row count (per-table sizing)."""
    methods = dict(spec.table_methods)
    rows = sum(min(methods.get(f.name, spec.method).rows, f.cardinality) for f in FEATURES)
    return rows * spec.dim * 4 + optimizer.state_bytes(rows, spec.dim)
