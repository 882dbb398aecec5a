"""fp16 tables and quantization-aware training through the fused kernels (`embtab.fuse`)."""

import pytest
import torch
from torch import nn

import embtab
from embtab import EmbeddingSpec, EmbeddingTables, FeatureSpec, SparseOptimizer
from embtab.quant.rows import RowRecorder
from embtab.quant.spec import LowPrecision
from embtab.quant.training import (
    watched_collections,
    fp32_update,
    round_to_grid,
    stochastic_round_fp16,
    stochastic_round_to_grid,
)
from embtab.checkpoint import load_training_state, training_state
from embtab.fused_state import physical_weights
from embtab.testing import random_kjt
from torchrec import KeyedJaggedTensor


def features(sequence: bool = False) -> tuple[FeatureSpec, ...]:
    pooling = "none" if sequence else "sum"
    return (
        FeatureSpec("user", 50),
        FeatureSpec("item", 30),
        FeatureSpec("hist", 30, pooling=pooling, table="item"),
        FeatureSpec("genre", 7, pooling=pooling),
    )


class Squares(nn.Module):
    """A loss with a different gradient for every looked-up element (pooled and sequence outputs)."""

    def __init__(self, tables: EmbeddingTables) -> None:
        super().__init__()
        self.tables = tables

    def forward(self, kjt) -> torch.Tensor:
        out = self.tables(kjt)
        loss = (out.pooled.values() ** 2).sum()
        for jagged in out.sequence.values():
            loss = loss + (jagged.values() ** 3).sum()
        return loss


def fused(spec: EmbeddingSpec, optimizer: SparseOptimizer) -> tuple[nn.Module, EmbeddingTables]:
    tables = EmbeddingTables(spec)
    return embtab.fuse(Squares(tables), optimizer), tables


def fused_weights(dmp: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k.split(".")[-2]: v.local_shards()[0].tensor for k, v in dmp.state_dict().items() if k.endswith(".weight")
    }


@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad", "adagrad"])
@pytest.mark.parametrize("sequence", [False, True])
def test_recorded_rows_reproduce_the_fused_update(kind: str, sequence: bool) -> None:
    """The rebuilt gradient and fp32 update of the touched rows equal what the fused kernel did."""
    torch.manual_seed(0)
    optimizer = SparseOptimizer(kind, lr=0.1, weight_decay=0.01)
    dmp, tables = fused(EmbeddingSpec(features(sequence), dim=8), optimizer)
    weights = fused_weights(dmp)
    momentum = {
        n.rsplit(".", 1)[0]: v.local_shards()[0].tensor
        for per_param in dmp.fused_optimizer.state_dict()["state"].values()
        for n, v in per_param.items()
    }
    touched = []
    RowRecorder(watched_collections(tables, {"user", "item", "genre"}), weights, touched.extend)
    dmp(random_kjt(features(sequence), 6, seed=1)).backward()
    assert {t.table for t in touched} == {"user", "item", "genre"}
    for rows in touched:
        kernel = weights[rows.table][rows.rows]
        assert (kernel - rows.before).abs().max() > 1e-3
        state = momentum[rows.table][rows.rows] if rows.table in momentum else None
        torch.testing.assert_close(fp32_update(rows, optimizer, state), kernel, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["robe", "tt_rec"])
def test_recorded_batch_size_is_the_samples_not_the_distinct_lookups(method: str) -> None:
    """ALPT scales its step gradient by 1 / sqrt(B d qmax), B the step's samples; a table whose
    lookups hold one bag per distinct id or row reports the samples all the same."""
    from embtab.methods import method_from_dict

    pooled = tuple(FeatureSpec(name, 1000) for name in ("a", "b"))
    spec = EmbeddingSpec(pooled, dim=16, method=method_from_dict({"name": method, **METHOD_SIZES[method]}))
    tables = EmbeddingTables(spec)
    dmp = embtab.fuse(tables, SparseOptimizer("sgd", lr=0.1))
    touched = []
    weights = physical_weights(tables)
    RowRecorder(watched_collections(tables, set(weights)), weights, touched.extend, batch_from=tables)
    ids = torch.randint(0, 20, (2 * 64,), generator=torch.Generator().manual_seed(0))  # 64 samples, <= 20 ids
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=ids, lengths=torch.ones(128, dtype=torch.int64))
    dmp(kjt).pooled.values().square().sum().backward()
    assert touched and {t.batch_size for t in touched} == {64}


def test_fp16_tables_train_through_fuse_and_checkpoints_round_trip() -> None:
    torch.manual_seed(0)
    spec = EmbeddingSpec(features(), dim=8, precision="fp16", table_precisions=(("user", "fp32"),))
    dmp, tables = fused(spec, SparseOptimizer("rowwise_adagrad", lr=0.1))
    weights = fused_weights(dmp)
    assert weights["item"].dtype == torch.float16 and weights["user"].dtype == torch.float32
    before = {k: v.clone() for k, v in weights.items()}
    for seed in range(3):
        dmp(random_kjt(features(), 8, seed=seed)).backward()
    assert all((weights[k] != before[k]).any() for k in weights)
    saved = training_state(dmp)
    assert saved["model"]["tables.ebc.embedding_bags.item.weight"].dtype == torch.float16
    other, _ = fused(spec, SparseOptimizer("rowwise_adagrad", lr=0.1))
    load_training_state(other, saved)
    for name, value in fused_weights(other).items():
        assert torch.equal(value, weights[name])
    assert torch.equal(physical_weights(other)["item"], weights["item"])


def test_memory_bytes_count_the_stored_precision() -> None:
    spec = EmbeddingSpec(features(), dim=8, precision="fp16", table_precisions=(("user", "fp32"),))
    report = EmbeddingTables(spec).memory_bytes(SparseOptimizer("rowwise_adagrad"))
    assert report.tables["item"].parameter_bytes == 30 * 8 * 2
    assert report.tables["user"].parameter_bytes == 50 * 8 * 4
    assert report.tables["item"].optimizer_bytes == 30 * 4


def test_memory_bytes_count_the_qat_state() -> None:
    def method_bytes(settings: LowPrecision) -> int:
        return EmbeddingTables(EmbeddingSpec(features(), dim=8, low_precision=settings)).memory_bytes().method_bytes

    assert method_bytes(LowPrecision()) == 0
    assert method_bytes(LowPrecision(qat="alpt", tables=("user",))) == 50 * 12
    assert method_bytes(LowPrecision(qat="lpt")) == 3 * 4


def test_bad_precision_and_bits_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="precision 'bf16'.*expected one of"):
        EmbeddingSpec(features(), precision="bf16")
    with pytest.raises(ValueError, match="table 'item'.*'int8'"):
        EmbeddingSpec(features(), table_precisions=(("item", "int8"),))
    with pytest.raises(ValueError, match="table_precisions names table 'nope'"):
        EmbeddingSpec(features(), table_precisions=(("nope", "fp16"),))
    with pytest.raises(ValueError, match="bits is 3; expected one of"):
        LowPrecision(qat="alpt", bits=3)
    with pytest.raises(ValueError, match="qat is 'dorefa'"):
        LowPrecision(qat="dorefa")
    data = {"features": [{"name": "a", "cardinality": 4}], "precision": "fp8"}
    with pytest.raises(ValueError, match="'fp8'"):
        EmbeddingSpec.from_dict(data)


def test_spec_reads_precision_from_toml_data() -> None:
    data = {
        "features": [{"name": "a", "cardinality": 4}, {"name": "b", "cardinality": 9}],
        "precision": "fp16",
        "table_precisions": {"b": "fp32"},
        "low_precision": {"qat": "lpt", "bits": 4, "tables": ["b"]},
    }
    spec = EmbeddingSpec.from_dict(data)
    assert [t.precision for t in spec.tables()] == ["fp16", "fp32"]
    assert spec.low_precision == LowPrecision(qat="lpt", bits=4, tables=("b",))


def test_stochastic_fp16_rounding_is_unbiased_and_lands_small_updates() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2.0**-10 / 4)  # a quarter of an fp16 ulp above 1
    rounded = stochastic_round_fp16(x, generator).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2.0**-10}
    assert abs(rounded.mean().item() - x[0].item()) < 2e-5
    assert torch.equal(x.to(torch.float16).float(), torch.ones_like(x))  # round to nearest loses it


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_small_fp16_updates_land_only_with_stochastic_rounding(rounding: str) -> None:
    """lr 2e-6: every update is below half an fp16 ulp of the rows' values."""
    torch.manual_seed(0)
    spec = EmbeddingSpec(
        features(), dim=8, precision="fp16", low_precision=LowPrecision(fp16_rounding=rounding)
    )
    dmp, _ = fused(spec, SparseOptimizer("sgd", lr=2e-6))
    weights = fused_weights(dmp)
    with torch.no_grad():
        for w in weights.values():
            w.fill_(0.5)
    for seed in range(10):
        dmp(random_kjt(features(), 8, seed=seed)).backward()
    moved = sum(int((w != 0.5).sum()) for w in weights.values())
    assert (moved == 0) == (rounding == "nearest")


class Outputs(torch.nn.Module):
    """The tables' pooled and sequence outputs, flattened (what export must reproduce)."""

    def __init__(self, tables: EmbeddingTables) -> None:
        super().__init__()
        self.tables = tables

    def forward(self, kjt) -> torch.Tensor:
        out = self.tables(kjt)
        sequence = [jagged.values().flatten() for jagged in out.sequence.values()]
        return torch.cat([out.pooled.values().flatten(), *sequence])


def fake_quant_reference(weights: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent fake quantization: nearest grid point of ``step * {-2^(b-1) .. 2^(b-1) - 1}``."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return step * torch.clamp(torch.round(weights / step), low, high)


@pytest.mark.parametrize("scheme", ["lpt", "alpt"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_qat_forward_equals_a_fake_quant_reference(scheme: str, bits: int) -> None:
    from embtab.testing import reference_pooled

    torch.manual_seed(0)
    spec = EmbeddingSpec(features(), dim=8, low_precision=LowPrecision(qat=scheme, bits=bits))
    tables = EmbeddingTables(spec)
    initial = physical_weights(tables)
    dmp = embtab.fuse(Outputs(tables), SparseOptimizer("rowwise_adagrad", lr=0.05))
    steps = {n: (1.0 / rows) ** 0.5 / 2 ** (bits - 2) for n, rows in (("user", 50), ("item", 30), ("genre", 7))}
    quantized = {n: fake_quant_reference(w, torch.tensor(steps[n]), bits) for n, w in initial.items()}
    kjt = random_kjt(features(), 8, seed=3)
    expected = reference_pooled(features(), kjt, lambda table, ids: quantized[table][ids])
    dmp.eval()
    got = dmp(kjt)[: expected.numel()].view_as(expected)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scheme", ["lpt", "alpt"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_qat_weights_stay_on_the_grid_and_export_reproduces_the_eval_outputs(scheme: str, bits: int) -> None:
    from embtab.quant.export import export, row_bytes

    torch.manual_seed(0)
    spec = EmbeddingSpec(features(True), dim=16, low_precision=LowPrecision(qat=scheme, bits=bits, step_lr=1e-3))
    tables = EmbeddingTables(spec)
    dmp = embtab.fuse(Outputs(tables), SparseOptimizer("rowwise_adagrad", lr=0.05))
    initial_steps = tables.low_precision.step_of("item").clone()
    for seed in range(5):
        (dmp(random_kjt(features(True), 16, seed=seed)) ** 2).sum().backward()
    weights = fused_weights(dmp)
    for name in ("user", "item"):
        step = tables.low_precision.step_of(name).unsqueeze(1)
        codes = weights[name] / step
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    moved = tables.low_precision.step_of("item") != initial_steps
    assert bool(moved.any()) == (scheme == "alpt")
    kjt = random_kjt(features(True), 8, seed=9)
    dmp.eval()
    with torch.no_grad():
        expected = dmp(kjt)
    served = export(dmp, f"int{bits}")
    assert row_bytes(served, "item") == {8: 20, 4: 12, 2: 8}[bits]
    got = Outputs(served)(kjt)
    scale = expected.abs().max()
    torch.testing.assert_close(got, expected, atol=float(scale) * 2.0**-10, rtol=2.0**-10)


def test_lsq_step_gradient_matches_autograd_through_a_straight_through_round() -> None:
    from embtab.quant.training import lsq_step_grad

    torch.manual_seed(0)
    values, grad = torch.randn(5, 8), torch.randn(5, 8)
    step = torch.rand(5, 1) * 0.3 + 0.05
    leaf = step.clone().requires_grad_()
    clipped = torch.clamp(values / leaf, -8, 7)
    rounded = clipped + (clipped.round() - clipped).detach()
    (leaf * rounded * grad).sum().backward()
    torch.testing.assert_close(lsq_step_grad(grad, values, step, -8, 7), leaf.grad.squeeze(1))


def test_stochastic_rounding_onto_the_grid_is_unbiased() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.full((100_000,), 0.13)
    rounded = stochastic_round_to_grid(values, torch.tensor(0.1), -4, 3, generator)
    assert set(rounded.unique().tolist()) == pytest.approx([0.1, 0.2])
    assert abs(rounded.mean().item() - 0.13) < 1e-3
    assert torch.equal(round_to_grid(torch.tensor([0.13, 5.0]), torch.tensor(0.1), -2, 1), torch.tensor([0.1, 0.1]))


def test_qat_needs_fp32_tables() -> None:
    spec = EmbeddingSpec(features(), dim=8, precision="fp16", low_precision=LowPrecision(qat="lpt"))
    with pytest.raises(ValueError, match="quantization-aware training keeps its grid in fp32 tables"):
        fused(spec, SparseOptimizer())


def test_budget_solver_counts_fp16_rows_at_two_bytes() -> None:
    from embtab.budget import solve_budget
    from embtab.methods.hashing_trick import HashingTrick

    optimizer = SparseOptimizer("sgd")
    base = EmbeddingSpec((FeatureSpec("user", 10_000),), dim=16)
    fits = {
        precision: solve_budget(
            EmbeddingSpec(base.features, dim=16, precision=precision), 64_000, optimizer, method=HashingTrick(rows=1)
        )
        for precision in ("fp32", "fp16")
    }
    assert fits["fp16"].spec.precision == "fp16"
    rows = {p: fit.spec.method.rows for p, fit in fits.items()}  # type: ignore[attr-defined]
    assert rows["fp32"] <= 1000 < rows["fp16"] <= 2000 and rows["fp16"] > 1.8 * rows["fp32"]


def test_table_steps_set_each_tables_grid() -> None:
    settings = LowPrecision(qat="alpt", bits=4, step=0.02, table_steps={"user": 0.125})
    dmp, tables = fused(EmbeddingSpec(features(), dim=8, low_precision=settings), SparseOptimizer())
    assert torch.all(tables.low_precision.step_of("user") == 0.125)
    assert torch.all(tables.low_precision.step_of("item") == 0.02)
    codes = fused_weights(dmp)["user"] / 0.125
    assert torch.equal(codes, codes.round())
    with pytest.raises(ValueError, match="step of 'user' must be > 0"):
        LowPrecision(table_steps=(("user", 0.0),))


METHOD_SIZES = {
    "hashing_trick": {"rows": 17},
    "multi_hash": {"rows": 19},
    "qr": {"collisions": 7},
    "multiplex": {"rows": 41},
    "robe": {"rows": 40},  # distinct ids
    "tt_rec": {"rank": 2},  # distinct core rows, in the per-id and the sequence lookups
}


def method_spec(name: str, **settings) -> EmbeddingSpec:
    from embtab.methods import method_from_dict

    method = method_from_dict({"name": name, **METHOD_SIZES[name]})
    return EmbeddingSpec(features(True), dim=16, method=method, **settings)


@pytest.mark.parametrize("method", list(METHOD_SIZES))
def test_qat_on_any_method_exports_its_eval_outputs(method: str) -> None:
    from embtab.quant.export import export

    torch.manual_seed(0)
    spec = method_spec(method, low_precision=LowPrecision(qat="alpt", bits=4, step_lr=1e-3))
    dmp = embtab.fuse(Outputs(EmbeddingTables(spec)), SparseOptimizer("rowwise_adagrad", lr=0.05))
    for seed in range(3):
        (dmp(random_kjt(features(True), 16, seed=seed)) ** 2).sum().backward()
    kjt = random_kjt(features(True), 8, seed=9)
    dmp.eval()
    with torch.no_grad():
        expected = dmp(kjt)
    got = Outputs(export(dmp, "int4"))(kjt)
    torch.testing.assert_close(got, expected, atol=float(expected.abs().max()) * 2.0**-10, rtol=2.0**-10)


@pytest.mark.parametrize("method", list(METHOD_SIZES))
def test_fp16_tables_of_any_method_train(method: str) -> None:
    torch.manual_seed(0)
    spec = method_spec(method, precision="fp16")
    dmp = embtab.fuse(Outputs(EmbeddingTables(spec)), SparseOptimizer("rowwise_adagrad", lr=0.05))
    weights = fused_weights(dmp)
    before = {k: v.clone() for k, v in weights.items()}
    (dmp(random_kjt(features(True), 16, seed=0)) ** 2).sum().backward()
    assert all(w.dtype == torch.float16 for w in weights.values())
    assert all((weights[k] != before[k]).any() for k in weights)


def test_reach_sets_the_step_of_every_bit_width() -> None:
    for bits in (8, 4, 2):
        settings = LowPrecision(qat="lpt", bits=bits, reach=4.0, table_steps={"user": 0.5})
        assert settings.step_of("item") == 4.0 / 2 ** (bits - 1) and settings.step_of("user") == 0.5
    assert LowPrecision(qat="lpt").step_of("item") is None
    with pytest.raises(ValueError, match="both step \\(0.1\\) and reach \\(4.0\\)"):
        LowPrecision(qat="lpt", step=0.1, reach=4.0)
    with pytest.raises(ValueError, match="step of 'reach' must be > 0"):
        LowPrecision(reach=-1.0)
