"""Sparse optimizer descriptions against the state fbgemm really keeps once fused."""

import math

import pytest

import embtab
from embtab.fused_state import optimizer_states
from embtab.optimizers import CPU_KINDS, OPTIMIZER_KINDS, optimizer_kind, state_width_of

FEATURES = (embtab.FeatureSpec("user", 30), embtab.FeatureSpec("item", 50))


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_described_state_tensors_are_those_fbgemm_keeps(kind):
    description = OPTIMIZER_KINDS[kind]
    dmp = embtab.fuse(embtab.EmbeddingTables(embtab.EmbeddingSpec(features=FEATURES, dim=8)), embtab.SparseOptimizer(kind))
    states = optimizer_states(dmp)
    for table, rows in (("user", 30), ("item", 50)):
        kept = {name.rsplit(".", 1)[-1]: math.prod(tensor.size()) for name, tensor in states.get(table, {}).items()}
        assert kept == {s.name: rows * s.floats_per_row(8) for s in description.states}
        assert sum(kept.values()) == rows * state_width_of(kind, 8) == description.state_bytes(rows, 8) // 4


def test_adam_is_described_as_gpu_only_and_refused_on_cpu():
    assert "adam" not in CPU_KINDS and optimizer_kind("adam").state_floats_per_row(4) == 8
    with pytest.raises(ValueError, match="'adam' runs only on CUDA"):
        embtab.SparseOptimizer("adam").check_device("cpu")


def test_unknown_kind_names_the_valid_kinds():
    with pytest.raises(ValueError, match=r"'lamb' is not fused by fbgemm; expected one of \('sgd'"):
        embtab.SparseOptimizer("lamb")
    assert state_width_of(None, 8) == 0
