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
    with pytest.raises(ValueError, match="unknown \\[train\\] keys \\['epoch'\\]"):
        run({**TINY, "train": {"epoch": 1}}, tmp_path / "bad")
