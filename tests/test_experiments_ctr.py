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


def test_torchrecs_own_dlrm_runs_from_its_model_name(tmp_path):
    """``model.name = "torchrec_dlrm"``: torchrec's DLRM, unchanged, over compressed embtab tables;
    with the full table it scores what embtab's DLRM scores (same arches, same seed)."""
    torchrec_model = {"name": "torchrec_dlrm", "bottom_hidden": [16], "top_hidden": [16]}
    full = run({**TINY, "model": torchrec_model}, tmp_path / "full")
    reference = run(TINY, tmp_path / "embtab")
    assert full["model"] == "torchrec_dlrm" and full["test_auc"] > 0.55
    assert full["test_auc"] == pytest.approx(reference["test_auc"], abs=1e-6)
    assert full["total_parameters"] == reference["total_parameters"]
    qr = run({**TINY, "model": torchrec_model, "embedding": {"dim": 8, "method": {"name": "qr", "collisions": 4}}}, tmp_path / "qr")
    assert qr["embedding_bytes"] < full["embedding_bytes"] / 2 and qr["test_auc"] > 0.5


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


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trian": {"epochs": 2}}, r"configuration sections: unknown keys \['trian'\]"),
        ({"embedding": {"dim": 8, "method": {"name": "full"}, "dims": 4}}, r"\[embedding\]: unknown keys \['dims'\]"),
        ({"embedding": {"dim": 12.9}}, r"dim must be an integer >= 1, got 12.9"),
        ({"embedding": {"dim": 8, "budget_bytes": 0}}, r"budget_bytes = 0, expected a whole number of bytes >= 1"),
        ({"embedding": {"dim": 8, "budget_bytes": float("nan")}}, r"budget_bytes = nan"),
        ({"embedding": {"dim": 8, "budget_bytes": float("inf")}}, r"budget_bytes = inf"),
        ({"embedding": {"dim": 8, "method": {"name": "hashing_trick", "rowz": 9}}}, r"\[embedding\]: .*rowz"),
        ({"embedding": {"dim": 8, "method": {"name": "hashing_trick", "rows": 9.5}}}, r"rows = 9.5, expected an integer"),
        ({"train": {"epochs": 0}}, r"\[train\]: epochs = 0, expected an integer >= 1"),
        ({"train": {"epochs": 1.5}}, r"\[train\]: epochs = 1.5, expected an integer"),
        ({"train": {"progress": "false"}}, r"\[train\]: progress = 'false', expected true or false"),
        ({"train": {"sparse_lr": float("nan")}}, r"\[train\]: sparse_lr = nan, expected a finite number"),
        ({"model": {"name": "dlrm", "top_hiden": [4]}}, r"\[model\] dlrm: unknown keys \['top_hiden'\]"),
        ({"model": {"name": "dlrm", "top_hidden": 4}}, r"\[model\] dlrm: top_hidden = 4, expected a list"),
        ({"data": {**TINY["data"], "num_sample": 10}}, r"\[data\] synthetic: unknown keys \['num_sample'\]"),
        ({"data": {**TINY["data"], "num_samples": 3000.5}}, r"\[data\] synthetic: num_samples = 3000.5"),
    ],
)
def test_every_config_layer_rejects_unknown_keys_and_bad_values(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        run({**TINY, **change}, tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_a_typo_in_a_config_file_or_override_is_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[embeding]\ndim = 4\n")
    with pytest.raises(ValueError, match=r"run.toml: sections: unknown keys \['embeding'\]"):
        load_config(str(path), [], {})
    with pytest.raises(ValueError, match=r"\[train\]: unknown keys \['epoch'\]"):
        load_config(None, ["train.epoch=3"], {})
    with pytest.raises(ValueError, match=r"budget_bytes = 0"):
        load_config(None, [], {"budget": 0})


def test_parameters_count_elements_whatever_their_precision(tmp_path):
    fp32 = run(TINY, tmp_path / "fp32")
    fp16 = run({**TINY, "embedding": {**TINY["embedding"], "precision": "fp16"}}, tmp_path / "fp16")
    assert fp16["embedding_bytes"] < fp32["embedding_bytes"]
    assert fp16["embedding_parameters"] == fp32["embedding_parameters"] == 4 * 300 * 8
    assert fp16["total_parameters"] == fp32["total_parameters"]


def test_an_export_precision_budgets_served_bytes_and_tests_the_served_model(tmp_path):
    embedding = {
        "dim": 8, "method": {"name": "hashing_trick"}, "budget_bytes": 4000,
        "low_precision": {"qat": "alpt", "bits": 4}, "export_precision": "int4",
    }
    summary = run({**TINY, "embedding": embedding}, tmp_path / "int4")
    assert 0.9 * 4000 <= summary["served_bytes"] <= 4000 < summary["embedding_bytes"]
    assert summary["served_precision"] == "int4"
    assert summary["served_test_auc"] == pytest.approx(summary["test_auc"], abs=1e-4)
    with pytest.raises(ValueError, match="export_precision: export precision 'int3'"):
        run({**TINY, "embedding": {**embedding, "export_precision": "int3"}}, tmp_path / "bad")
