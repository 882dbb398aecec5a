"""The trainer: same seed same result, resume equals uninterrupted, checkpoint checks."""

import pytest
import torch

import embtab
from data import make_synthetic
from experiments.trainer import CHECKPOINT, METRICS, TrainConfig, Trainer
from models import DLRM

CONFIG = TrainConfig(epochs=2, batch_size=256, eval_batch_size=1024, sparse_lr=0.05, patience=5, progress=False)


@pytest.fixture(scope="module")
def splits():
    return make_synthetic(num_samples=4000, num_fields=4, cardinalities=500, dense_dim=3, seed=1)


def build(splits, seed: int = 0, dim: int = 8) -> DLRM:
    torch.manual_seed(seed)
    spec = embtab.EmbeddingSpec(features=splits.feature_specs(), dim=dim)
    return DLRM(embtab.EmbeddingTables(spec), dense_dim=splits.dense_dim, bottom_hidden=(16,), top_hidden=(16,))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    from embtab.checkpoint import training_state

    return training_state(trainer.model)["model"]


def test_same_seed_gives_the_same_result(splits, tmp_path):
    first = Trainer(build(splits), splits, CONFIG, tmp_path / "a").fit()
    second = Trainer(build(splits), splits, CONFIG, tmp_path / "b").fit()
    assert first["test_auc"] > 0.55
    assert abs(first["test_auc"] - second["test_auc"]) < 1e-6
    assert abs(first["test_logloss"] - second["test_logloss"]) < 1e-6
    metrics = (tmp_path / "a" / METRICS).read_text().splitlines()
    assert metrics[0].startswith("epoch,step,valid_auc") and len(metrics) == 3


def test_resume_after_a_stop_equals_an_uninterrupted_run(splits, tmp_path):
    config = TrainConfig(**{**CONFIG.__dict__, "checkpoint_every": 5})
    whole = Trainer(build(splits), splits, config, tmp_path / "whole")
    whole_result = whole.fit()
    stopped = Trainer(build(splits), splits, config, tmp_path / "cut", stop_after_steps=23)
    assert stopped.fit() == {"stopped_at_step": 23}
    resumed = Trainer(build(splits, seed=99), splits, config, tmp_path / "cut")
    assert resumed.state.step == 20 and resumed.state.epoch == 1
    resumed_result = resumed.fit()
    assert resumed_result["test_auc"] == pytest.approx(whole_result["test_auc"], abs=1e-6)
    for key, value in weights(whole).items():
        torch.testing.assert_close(weights(resumed)[key], value, rtol=0, atol=1e-6)


def test_a_checkpoint_of_another_model_is_refused_and_changes_nothing(splits, tmp_path):
    from embtab.checkpoint import load_checkpoint, load_training_state, training_state

    Trainer(build(splits, dim=8), splits, TrainConfig(**{**CONFIG.__dict__, "epochs": 1}), tmp_path / "run").fit()
    with pytest.raises(ValueError, match="belongs to another run: embedding_specs.0.dim: checkpoint 8, this run 4"):
        Trainer(build(splits, dim=4), splits, CONFIG, tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT)["training"]
    last = sorted(k for k in saved["model"] if "embedding_bags" in k)[-1]
    saved["model"][last] = saved["model"][last][:1]
    target = embtab.fuse(build(splits, seed=5), CONFIG.sparse())
    before = training_state(target)
    with pytest.raises(ValueError, match=f"{last}"):
        load_training_state(target, saved)
    after = training_state(target)
    for part in ("model", "sparse_optimizer"):
        for key, value in before[part].items():
            assert torch.equal(after[part][key], value), key


def build_offloaded(splits, cache_rows: int, seed: int = 0) -> DLRM:
    from embtab.methods.offloaded import Offloaded

    torch.manual_seed(seed)
    spec = embtab.EmbeddingSpec(features=splits.feature_specs(), dim=8, method=Offloaded(cache_rows, policy="lru"))
    return DLRM(embtab.EmbeddingTables(spec), dense_dim=splits.dense_dim, bottom_hidden=(16,), top_hidden=(16,))


def test_offloaded_tables_train_through_the_engine_and_resume_exactly(splits, tmp_path):
    """4 tables x 500 ids behind one 1200-row cache: training learns, evaluation reads the stores,
    and a run stopped after a checkpoint resumes to the uninterrupted result (stores included)."""
    config = TrainConfig(**{**CONFIG.__dict__, "checkpoint_every": 5})
    whole = Trainer(build_offloaded(splits, 1200), splits, config, tmp_path / "whole")
    whole_result = whole.fit()
    assert whole_result["test_auc"] > 0.55
    stats = whole.offloaded.offload.stats()["offload_cache"]  # the test evaluation's cache: read, never written
    assert stats.loaded_rows > 0 and stats.written_rows == 0
    stopped = Trainer(build_offloaded(splits, 1200), splits, config, tmp_path / "cut", stop_after_steps=23)
    assert stopped.fit() == {"stopped_at_step": 23}
    resumed = Trainer(build_offloaded(splits, 1200, seed=99), splits, config, tmp_path / "cut")
    resumed_result = resumed.fit()
    assert resumed_result["test_auc"] == pytest.approx(whole_result["test_auc"], abs=1e-6)
    for name, store in whole.offloaded.stores.items():
        torch.testing.assert_close(resumed.offloaded.stores[name].weights, store.weights, rtol=0, atol=1e-6)


def test_an_offload_cache_too_small_for_the_evaluation_batch_is_refused_at_start(splits, tmp_path):
    """Training batches of 32 samples x 4 fields fit 300 rows; evaluation batches of 400 do not."""
    config = TrainConfig(**{**CONFIG.__dict__, "batch_size": 32, "eval_batch_size": 4000})
    with pytest.raises(ValueError, match=r"offload cache 'offload_cache' has 300 rows \(cache_rows\) .*lower \[train\] eval_batch_size"):
        Trainer(build_offloaded(splits, 300), splits, config, tmp_path / "run")
    assert not (tmp_path / "run" / CHECKPOINT).exists()
