"""The layout step alone: logical tables + method declarations -> pieces, buckets, groups, configs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from embtab.config import FeatureSpec, LogicalTable
from embtab.layout import PER_ID_BUCKET, POOLED_BUCKET, compile_layout
from embtab.methods import FullTable
from embtab.methods.base import PhysicalTable


@dataclass
class Declared:
    """What a compiled method declares to the layout, without building one."""

    physical_tables: tuple[PhysicalTable, ...]
    pooling_commutes: bool = True
    signature: tuple | None = None
    combine_uses_ids: bool = False
    distinct_rows: bool = False
    distinct_ids: bool = False

    def combine_signature(self) -> tuple | None:
        return self.signature


def table(name: str, *features: FeatureSpec) -> LogicalTable:
    return LogicalTable(name, features[0].cardinality, 8, features, FullTable())


def test_buckets_follow_pooling_and_sequences():
    user = table("user", FeatureSpec("user", 10))
    item = table("item", FeatureSpec("item", 6), FeatureSpec("hist", 6, pooling="none", table="item"))
    tag = table("tag", FeatureSpec("tag", 5))
    methods = {
        "user": Declared((PhysicalTable("user@0", 4, 8), PhysicalTable("user@1", 3, 8))),
        "item": Declared((PhysicalTable("item", 6, 8),)),
        "tag": Declared((PhysicalTable("tag", 5, 4),), pooling_commutes=False),
    }
    layout = compile_layout([user, item, tag], methods)
    assert [(p.table, p.probe, p.keys, p.bucket) for p in layout.pieces] == [
        ("user", 0, ("user@0",), POOLED_BUCKET),
        ("user", 1, ("user@1",), POOLED_BUCKET),
        ("item", 0, ("item", "hist"), "dim8"),
        ("tag", 0, ("tag",), PER_ID_BUCKET),
    ]
    assert layout.feature_order == ["user", "item", "hist", "tag"]
    assert layout.bucket_keys == {POOLED_BUCKET: ["user@0", "user@1"], "dim8": ["item", "hist"], PER_ID_BUCKET: ["tag"]}
    configs = {c.name: (c.num_embeddings, c.embedding_dim, c.feature_names) for c in layout.bag_configs(POOLED_BUCKET)}
    assert configs == {"user@0": (4, 8, ["user@0"]), "user@1": (3, 8, ["user@1"])}
    assert [(c.name, c.feature_names) for c in layout.sequence_configs("dim8")] == [("item", ["item", "hist"])]


def test_a_shared_table_is_looked_up_as_its_most_demanding_user_needs():
    shared = PhysicalTable("shared", 16, 4)
    a, b = table("a", FeatureSpec("a", 50)), table("b", FeatureSpec("b", 40), FeatureSpec("s", 40, pooling="none", table="b"))
    layout = compile_layout([a, b], {"a": Declared((shared,)), "b": Declared((shared,))})
    assert {p.bucket for p in layout.pieces} == {"dim4"} and list(layout.physical) == ["shared"]
    assert [(c.name, c.feature_names) for c in layout.sequence_configs("dim4")] == [("shared", ["a", "b", "s"])]


def test_runs_of_like_tables_are_grouped():
    names = ["a", "b", "c", "d"]
    tables = [table(n, FeatureSpec(n, 9)) for n in names]
    methods = {n: Declared((PhysicalTable(n, 9, 8),), signature=("identity",)) for n in names[:3]}
    methods["d"] = Declared((PhysicalTable("d", 9, 8),))  # no signature: combined on its own
    layout = compile_layout(tables, methods)
    assert layout.group_of == {"a": "a", "b": "a", "c": "a"} and layout.group("a") == ["a", "b", "c"]
    assert layout.group_members == {"a": [("a", 0), ("b", 0), ("c", 0)]}
    assert layout.ungrouped().group_of == {} and layout.ungrouped().pieces == layout.pieces


def test_tables_that_differ_in_distinct_ids_run_apart():
    names = ["a", "b", "c"]
    tables = [table(n, FeatureSpec(n, 9)) for n in names]
    methods = {
        n: Declared((PhysicalTable(n, 9, 8),), pooling_commutes=False, signature=("s",), distinct_ids=n != "c")
        for n in names
    }
    assert compile_layout(tables, methods).group_of == {"a": "a", "b": "a"}


def test_bad_declarations_are_named():
    one = table("one", FeatureSpec("one", 9))
    with pytest.raises(ValueError, match="physical table 'one' has width 6; fbgemm's fused kernels need a multiple of 4"):
        compile_layout([one], {"one": Declared((PhysicalTable("one", 9, 6),))})
    two = table("two", FeatureSpec("two", 9))
    methods = {"one": Declared((PhysicalTable("t", 9, 8),)), "two": Declared((PhysicalTable("t", 5, 8),))}
    with pytest.raises(ValueError, match="physical table 't' is declared as"):
        compile_layout([one, two], methods)


def test_a_combine_that_takes_ids_must_see_them_per_id_and_alone():
    tables = [table("user", FeatureSpec("user", 10))]
    declared = Declared((PhysicalTable("user", 10, 4),), pooling_commutes=True, combine_uses_ids=True)
    with pytest.raises(ValueError, match="table 'user': a combine that takes the ids needs per-id lookups"):
        compile_layout(tables, {"user": declared})
    alone = Declared((PhysicalTable("user", 10, 4),), pooling_commutes=False, combine_uses_ids=True)
    assert compile_layout(tables, {"user": alone}).pieces[0].bucket == PER_ID_BUCKET


@pytest.mark.parametrize(
    "declared",
    [
        {"pooling_commutes": True},
        {"pooling_commutes": False, "combine_uses_ids": True},
        {"pooling_commutes": False, "signature": ("run",)},
    ],
    ids=["pooled", "with_ids", "grouped"],
)
def test_a_combine_of_distinct_rows_runs_per_table_on_per_id_lookups(declared):
    tables = [table("user", FeatureSpec("user", 10))]
    bad = Declared((PhysicalTable("user", 10, 4),), distinct_rows=True, **declared)
    with pytest.raises(ValueError, match="table 'user': a combine of distinct rows needs per-id lookups"):
        compile_layout(tables, {"user": bad})
    good = Declared((PhysicalTable("user", 10, 4),), pooling_commutes=False, distinct_rows=True)
    assert compile_layout(tables, {"user": good}).pieces[0].bucket == PER_ID_BUCKET


def test_a_combine_of_distinct_ids_runs_on_per_id_lookups():
    tables = [table("user", FeatureSpec("user", 10))]
    pooled = Declared((PhysicalTable("user", 10, 4),), distinct_ids=True)
    with pytest.raises(ValueError, match="table 'user': a combine of distinct ids needs per-id lookups"):
        compile_layout(tables, {"user": pooled})
    per_id = Declared((PhysicalTable("user", 10, 4),), pooling_commutes=False, distinct_ids=True)
    assert compile_layout(tables, {"user": per_id}).pieces[0].bucket == PER_ID_BUCKET
