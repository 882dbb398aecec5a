"""experiments.ctr: TOML config with overrides, and one small run end to end."""

import json

import pytest

from experiments.ctr import load_config, run

TINY = {
    "data": {"name": "synthetic", "num_samples": 3000, "num_fields": 4, "cardinalities": 300, "dense_dim": 3},
    "model": {"name": "dlrm", "bottom_hidden": [16], "top_hidden": [16]},
    "embedding": {"dim": 8, "method": {"name": "full"}},
    "train": {"epochs": 1, "batch_size": 256, "progress": False},
}


def test_config_file_flags_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nname = "embedding_mlp"\nmlp_hidden = [8]\n[train]\nepochs = 3\n')
    config = load_config(
        str(path),
        ["train.sparse_lr=0.2", "model.mlp_hidden=[4, 2]", "embedding.method.rows=64"],
        {"epochs": 5, "method": "hashing_trick"},
    )
    assert config["model"] == {"name": "embedding_mlp", "mlp_hidden": [4, 2]}
    assert config["train"] == {"epochs": 5, "sparse_lr": 0.2}
    assert config["embedding"]["method"] == {"name": "hashing_trick", "rows": 64}
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["nonsense"], {})


def test_a_run_reports_every_figure_and_a_budget_sizes_the_method(tmp_path):
    summary = run(TINY, tmp_path / "full")
    saved = json.loads((tmp_path / "full" / "result.json").read_text())
    for key in (
        "test_auc",
        "test_logloss",
        "embedding_bytes",
        "total_parameters",
        "train_samples_per_s",
        "inference_samples_per_s",
    ):
        assert saved[key] == pytest.approx(summary[key]) and saved[key] > 0
    assert summary["test_auc"] > 0.55
    hashed = {
        **TINY,
        "embedding": {
            "dim": 8,
            "method": {"name": "hashing_trick"},
            "budget_bytes": summary["embedding_bytes"] // 4,
        },
    }
    small = run(hashed, tmp_path / "hashed")
    assert (
        0.9 * summary["embedding_bytes"] // 4 <= small["embedding_bytes"] <= summary["embedding_bytes"] // 4
    )
    with pytest.raises(ValueError, match="\\[train\\]: unknown keys \\['epoch'\\]"):
        run({**TINY, "train": {"epoch": 1}}, tmp_path / "bad")


def _distributed_run(rank: int, world: int, config: dict, out: str) -> None:
    import torch.distributed as dist

    run(config, out, process_group=dist.group.WORLD)


def test_two_ranks_train_like_one_process_and_only_rank_0_writes(tmp_path):
    """Column-wise sharding, each rank on its half of every global batch, uneven shares included
    (the last training batch and the evaluation splits hold odd numbers of samples)."""
    from embtab.testing import run_ranks

    config = {
        **TINY,
        "data": {**TINY["data"], "num_samples": 4001},
        "embedding": {"dim": 8, "method": {"name": "full"}},
        "sharding": {"default_types": ["column_wise"], "column_shard_width": 4},
        "train": {**TINY["train"], "epochs": 2, "threads": 1},
    }
    single = run(config, tmp_path / "one")
    run_ranks(_distributed_run, 2, config, str(tmp_path / "two"))
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["world_size"] == 2 and "column_wise" in two["plan"]
    assert two["test_auc"] == pytest.approx(single["test_auc"], abs=1e-4)
    assert two["test_logloss"] == pytest.approx(single["test_logloss"], abs=1e-4)
    assert two["history"][-1]["valid_auc"] == pytest.approx(single["history"][-1]["valid_auc"], abs=1e-4)
