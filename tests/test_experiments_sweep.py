"""experiments.sweep: a tiny sweep writes every output, and a re-run trains nothing."""

import json
import sys

import polars as pl

from experiments import sweep

ARGS = [
    "--dataset", "synthetic", "--model", "dlrm", "--epochs", "1", "--seeds", "1",
    "--methods", "full", "hashing_trick", "--budgets", "1", "1/4",
    "--set", "data.num_samples=2000", "--set", "data.num_fields=3", "--set", "data.cardinalities=200",
    "--set", "data.dense_dim=2", "--set", "model.bottom_hidden=[8]", "--set", "model.top_hidden=[8]",
    "--set", "embedding.dim=8", "--set", "train.batch_size=256",
]


def test_tiny_sweep_writes_outputs_and_rerun_does_no_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sweep", *ARGS, "--out", str(tmp_path)])
    sweep.main()
    for name in ("results.parquet", "results.csv", "summary.md", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0
    results = pl.read_parquet(tmp_path / "results.parquet")
    assert results.height == 3  # the full table is the reference at its own size only
    assert (results.filter(pl.col("status") == "ok")["wall_seconds"] > 0).all()
    status = {(r["method"], r["budget"]): r["status"] for r in results.iter_rows(named=True)}
    assert status == {("full", "1"): "ok", ("hashing_trick", "1"): "ok", ("hashing_trick", "1/4"): "ok"}
    whole = results.filter((pl.col("method") == "hashing_trick") & (pl.col("budget") == "1")).row(0, named=True)
    assert whole["parameter_ratio"] == 1.0  # at 1x every table is full: no table gets more rows than ids
    hashed = results.filter((pl.col("method") == "hashing_trick") & (pl.col("budget") == "1/4")).row(0, named=True)
    assert hashed["bytes"] <= hashed["budget_bytes"] and 0.2 < hashed["parameter_ratio"] <= 0.25
    assert "**" in (tmp_path / "summary.md").read_text()
    assert not list(tmp_path.glob("cells/*/*.pt"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(sweep, "run", no_training)
    sweep.main()
    assert pl.read_parquet(tmp_path / "results.parquet").height == 3


def test_parallel_cells_give_the_same_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sweep", *ARGS, "--jobs", "2", "--threads", "1", "--out", str(tmp_path)])
    sweep.main()
    results = pl.read_parquet(tmp_path / "results.parquet")
    assert results.height == 3
    assert results.filter(pl.col("status") == "ok").height == 3


def test_distributed_sweep_under_torchrun_matches_one_process(tmp_path, monkeypatch):
    import os
    import subprocess

    monkeypatch.setattr(sys, "argv", ["sweep", *ARGS, "--out", str(tmp_path / "one")])
    sweep.main()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "experiments.sweep", "--distributed", "--threads", "1", *ARGS]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run([*command, "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    one, two = (
        pl.read_parquet(tmp_path / name / "results.parquet").sort("method", "budget") for name in ("one", "two")
    )
    assert two["status"].to_list() == one["status"].to_list()
    ok = pl.col("status") == "ok"
    for a, b in zip(one.filter(ok)["test_auc"], two.filter(ok)["test_auc"]):
        assert abs(a - b) < 1e-4


LEARNED_ARGS = [
    "--dataset", "synthetic", "--model", "dlrm", "--epochs", "1", "--seeds", "1",
    "--methods", "pep", "hashing_trick+hot", "--budgets", "1/4", "p1/4",
    "--set", "data.num_samples=2000", "--set", "data.num_fields=3", "--set", "data.cardinalities=400",
    "--set", "data.dense_dim=2", "--set", "model.bottom_hidden=[8]", "--set", "model.top_hidden=[8]",
    "--set", "embedding.dim=8", "--set", "train.batch_size=256", "--set", "search.init_threshold=-4.0",
    "--set", "search.threshold_lr=0.05", "--set", "search.train={'epochs': 2, 'patience': 2}",
]


def test_sweep_with_a_learned_size_method_writes_every_output_and_rerun_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sweep", *LEARNED_ARGS, "--out", str(tmp_path)])
    sweep.main()
    for name in ("results.parquet", "results.csv", "summary.md", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0
    results = pl.read_parquet(tmp_path / "results.parquet")
    labels = set(results["method"].to_list())
    assert {"pep", "pep (learned)", "hashing_trick+hot"} <= labels
    pep = results.filter((pl.col("method") == "pep") & (pl.col("budget") == "1/4")).row(0, named=True)
    assert pep["status"] == "ok" and pep["bytes"] == pep["export_csr_bytes"] <= pep["budget_bytes"]
    assert pep["wall_seconds"] > 0 and pep["search_epochs"] >= 1
    hot = results.filter((pl.col("method") == "hashing_trick+hot") & (pl.col("budget") == "1/4")).row(0, named=True)
    assert hot["status"] == "ok" and json.loads(hot["parameters_json"])["tables"]["C1"]["hot_ids"]
    assert results.filter(pl.col("budget") == "p1/4")["status"].to_list().count("ok") == 1  # only the hashed one
    assert not list(tmp_path.glob("cells/**/*.pt"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(sweep, "run", no_training)
    monkeypatch.setattr("experiments.search.Run", no_training)
    sweep.main()
    assert pl.read_parquet(tmp_path / "results.parquet").height == results.height


def test_a_method_at_a_precision_is_one_entry():
    from experiments.sweep import Cell, cell_config

    base = {"embedding": {"dim": 8}, "train": {}}
    config = cell_config(base, Cell("hashing_trick@fp16", "1/4", 0), 4000, {"hashing_trick": {"salt": 3}})
    assert config["embedding"]["method"] == {"name": "hashing_trick", "salt": 3}
    assert config["embedding"]["precision"] == "fp16" and config["embedding"]["budget_bytes"] == 1000
    assert "precision" not in cell_config(base, Cell("qr", "1/4", 0), 4000, {})["embedding"]


def test_a_method_at_an_integer_precision_is_sized_and_tested_as_served(tmp_path, monkeypatch):
    import pytest

    from experiments.sweep import Cell, cell_config

    config = cell_config({"embedding": {"dim": 8}, "train": {}}, Cell("qr@int8", "1/4", 0), 4000, {})
    assert config["embedding"]["export_precision"] == "int8"
    assert config["embedding"]["low_precision"] == {"qat": "alpt", "bits": 8}
    assert sweep._budgets_of("full@int4", ["1/4", "1/16"]) == ["1"]  # the full table at its own size
    start, end = ARGS.index("--methods"), ARGS.index("--set")
    args = [*ARGS[:start], "--methods", "hashing_trick@int4", "--budgets", "1/4", *ARGS[end:]]
    monkeypatch.setattr(sys, "argv", ["sweep", *args, "--out", str(tmp_path)])
    sweep.main()
    row = pl.read_parquet(tmp_path / "results.parquet").row(0, named=True)
    assert (row["method"], row["status"], row["bytes_counted"]) == ("hashing_trick@int4", "ok", "served int4")
    assert 0.9 * row["budget_bytes"] <= row["bytes"] == row["served_bytes"] <= row["budget_bytes"] < row["train_bytes"]
    assert abs(row["test_auc"] - row["qat_test_auc"]) < 1e-4  # the served model scores what QAT evaluated
    monkeypatch.setattr(sys, "argv", ["sweep", *args, "--methods", "qr@int3", "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="qr@int3: sweep method suffix @: export precision 'int3'"):
        sweep.main()


def test_export_compressed_methods_are_charged_their_export_and_marked_unreachable_elsewhere(tmp_path, monkeypatch):
    from embtab.methods.dpq import code_bits

    args = [a for a in ARGS if a not in ("full", "hashing_trick")]
    at = args.index("--methods") + 1
    args[at:at] = ["dpq", "mgqe"]
    args += ["--set", "method_params={'dpq': {'parts': 2, 'codewords': 16}, 'mgqe': {'parts': 2, 'codewords': 16, 'rare_codewords': 4}}"]
    monkeypatch.setattr(sys, "argv", ["sweep", *args, "--budgets", "1/4", "1/16", "--out", str(tmp_path)])
    sweep.main()
    results = pl.read_parquet(tmp_path / "results.parquet")
    rows = {(r["method"], r["budget"]): r for r in results.iter_rows(named=True)}
    assert set(rows) == {(m, b) for m in ("dpq", "mgqe") for b in ("export", "1/4", "1/16")}
    dpq = rows[("dpq", "export")]
    codes = 3 * 200 * 2 * code_bits(16) // 8  # 3 fields of 200 ids, 2 parts of 4 bits
    assert dpq["bytes"] == codes + 3 * 2 * 16 * 4 * 4  # + each table's float32 codebook (2 x 16 x 4)
    assert dpq["train_bytes"] > 3 * 200 * 8 * 4  # the full query table trains
    assert dpq["parameter_ratio"] == dpq["bytes"] / (3 * 200 * 8 * 4)
    # 1/32 of the full bytes fills neither 1/4 nor 1/16 by 90%: both are unreachable, with the reason
    for budget in ("1/4", "1/16"):
        assert rows[("dpq", budget)]["status"] == "unreachable"
        assert "export size" in rows[("dpq", budget)]["reason"]
    mgqe = rows[("mgqe", "export")]
    hot = 3 * 20  # each table's 10% most frequent ids use every codeword (4 bits), the rest 2 bits
    assert mgqe["bytes"] == -(-(2 * (hot * 4 + (600 - hot) * 2)) // 8) + 3 * 2 * 16 * 4 * 4 + hot * 8
    assert "own export size" in (tmp_path / "summary.md").read_text()


def test_a_configuration_larger_than_the_full_table_is_not_ranked_best():
    from experiments.sweep import summarize

    rows = [
        {"method": "autosrh (learned)", "budget": "learned", "test_auc": 0.79, "ratio": 2.05},
        {"method": "dnis (learned)", "budget": "learned", "test_auc": 0.78, "ratio": 1.0},
        {"method": "optembed (learned)", "budget": "learned", "test_auc": 0.77, "ratio": 0.46},
    ]
    results = pl.DataFrame(
        [
            {"method": r["method"], "budget": r["budget"], "seed": 0, "status": "ok", "test_auc": r["test_auc"],
             "bytes": 1000, "parameter_ratio": r["ratio"], "wall_seconds": 1.0}
            for r in rows
        ]
    )
    summary = summarize(results)
    assert "**0.7800" in summary and "**0.7900" not in summary
    assert "own learned size: dnis (learned)" in summary
