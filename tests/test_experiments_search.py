"""experiments.search end to end on tiny synthetic data: every method, one budget, one seed."""

import json
import sys

from experiments.search import RELAXED_DEDUP, main

CONFIG = """
[data]
name = "synthetic"
num_samples = 3000
num_fields = 3
cardinalities = 400
dense_dim = 3
[model]
name = "dlrm"
bottom_hidden = [16]
top_hidden = [16]
[embedding]
dim = 8
[train]
epochs = 1
batch_size = 256
threads = 1
[search]
init_threshold = -4.0
threshold_lr = 0.05
[search.train]
epochs = 2
patience = 2
[search.evolution]
generations = 2
population = 4
mutations = 2
crossovers = 2
survivors = 3
"""


def test_every_method_lands_in_the_budget_and_the_export_matches(tmp_path, monkeypatch, capsys):
    path = tmp_path / "search.toml"
    path.write_text(CONFIG)
    out = tmp_path / "out"
    argv = ["search", "--config", str(path), "--budgets", "1/4", "--seeds", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    saved = json.loads((out / "result.json").read_text())
    cells = {c["method"]: c for c in saved["cells"]}
    assert set(cells) == {"full", "optembed", "optembed (learned)", "pep", "pep (learned)", "mde"}
    assert cells["optembed (learned)"]["budget"] == "learned" and "threshold_moved" in cells["optembed (learned)"]
    budget = cells["full"]["bytes"] // 4
    for name in ("optembed", "pep"):
        cell = cells[name]
        assert cell["bytes"] <= cell["budget_bytes"] == budget
        assert 0 < cell["parameter_ratio"] < 1
        assert cell["export_fp32_test_auc"] == cell["test_auc"]  # the inference export is the trained model
        assert abs(cell["int8_test_auc"] - cell["test_auc"]) < 0.01
        assert set(cell["widths"]) == {"C1", "C2", "C3"} and all(w % 4 == 0 for w in cell["widths"].values())
        assert 0 <= cell["rows_pruned"] < 1 and cell["search_s"] > 0 and cell["retrain_s"] > 0
    assert cells["optembed"]["evaluations"] >= 2
    assert cells["pep"]["bytes"] == cells["pep"]["export_csr_bytes"]  # charged what the CSR export allocates
    # width >= 4 of 8 with row-wise state: MDE cannot go below (16 + 4) / 36 of the full table
    assert "below the minimum of method 'mde'" in cells["mde"]["unreachable"]
    assert "| optembed | 1/4 |" in capsys.readouterr().out


def noise_problem(n: int = 8000, seed: int = 0):
    """One field that decides the label (100 ids) and one of pure noise (1000 ids): a problem
    where OptEmbed's reference prunes (the noise field's rows are worth nothing)."""
    import torch

    from data.batch import CTRDataset, DatasetSplits
    from embtab.config import FeatureSpec

    g = torch.Generator().manual_seed(seed)
    signal, noise = torch.randint(0, 100, (n,), generator=g), torch.randint(0, 1000, (n,), generator=g)
    labels = (torch.rand(n, generator=g) < torch.sigmoid(2 * (torch.rand(100, generator=g) * 2 - 1)[signal])).float()
    features = (FeatureSpec("signal", 100, required=True), FeatureSpec("noise", 1000, required=True))
    parts = [
        CTRDataset(name, features, {"signal": signal[lo:hi], "noise": noise[lo:hi]}, {}, torch.zeros(hi - lo, 1),
                   labels[lo:hi], ("d",))
        for name, lo, hi in (("train", 0, int(0.8 * n)), ("valid", int(0.8 * n), int(0.9 * n)), ("test", int(0.9 * n), n))
    ]
    return DatasetSplits(*parts, name="noise", vocab_sizes={"signal": 100, "noise": 1000})


def test_optembed_learned_thresholds_prune_rows_without_a_budget_shift(tmp_path):
    import torch

    import embtab
    from embtab.methods import OptEmbed
    from embtab.shard import embedding_tables_of, physical_weights
    from experiments.trainer import TrainConfig, Trainer
    from models import build_model

    splits = noise_problem()
    spec = embtab.EmbeddingSpec(features=splits.feature_specs(), dim=16, method=OptEmbed(t_lr=0.1, alpha=0.05))
    torch.manual_seed(0)
    model = build_model("dlrm", embtab.EmbeddingTables(spec), dense_dim=1, bottom_hidden=[8], top_hidden=[32])
    train = TrainConfig(epochs=6, batch_size=128, sparse_optimizer="adagrad", sparse_lr=0.01, patience=6,
                        progress=False, restore_best=False, threads=1)
    trainer = Trainer(model, splits, train, tmp_path)
    result = trainer.fit()
    weights, tables = physical_weights(trainer.model), embedding_tables_of(trainer.model)[0]
    pruned = {}
    for name, method in tables.methods.items():
        assert float(method.shift) == 0.0  # no budget
        pruned[name] = float((method.margins(weights[name]) <= 0).float().mean())
        assert float(method.threshold) > 0.3  # moved from 0
    assert pruned["noise"] > 0.3 and pruned["noise"] > 2 * pruned["signal"]
    assert result["test_auc"] > 0.75  # the signal is kept


def test_pep_learned_sparsity_reaches_its_target_and_snapshots_there(tmp_path):
    from fractions import Fraction

    from experiments.ctr import SECTIONS, load_config
    from experiments.search import Run, run_pep

    path = tmp_path / "search.toml"
    path.write_text(CONFIG.replace("epochs = 2\npatience = 2", "epochs = 6\npatience = 6").replace("threshold_lr = 0.05", "threshold_lr = 0.2\nthreshold_decay = 0.01"))
    config = load_config(str(path), [], {}, sections=(*SECTIONS, "search"))
    run = Run(config, 2024, tmp_path / "out")
    cells = run_pep(run, [Fraction(1, 2)])
    learned = next(c for c in cells if c["method"] == "pep (learned)")
    assert "test_auc" in learned, learned.get("unreachable")
    assert learned["bytes"] <= run.full_bytes // 2 and learned["reached_at_epoch"] >= 1
    from embtab.search.sparse import csr_charge

    dense = sum(csr_charge(400, 400 * 8) for _ in range(3))  # every element kept, as at the start
    trajectory = [t["csr_bytes"] for t in learned["sparsity_trajectory"]]
    assert trajectory[-1] <= run.full_bytes // 2 < dense and learned["threshold_moved"] > 0.1
    assert learned["bytes"] == learned["export_csr_bytes"]


def test_deeplight_dedup_autosrh_and_autodim_stages_land_in_the_budget(tmp_path, monkeypatch):
    path = tmp_path / "search.toml"
    path.write_text(CONFIG)
    out = tmp_path / "out"
    argv = ["search", "--config", str(path), "--methods", "full", "deeplight", "dedup", "autosrh", "autodim", "--budgets", "1/4", "3/4",
            "--seeds", "1", "--out", str(out), "--set", "search.block_rows=20", "--set", "search.prune_every=2",
            "--set", "search.damping_steps=0.5", "--set", "search.alpha_lr=0.05", "--set", "search.l1=0.01"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    saved = json.loads((out / "result.json").read_text())["cells"]
    cells = {c["method"]: c for c in saved if c["budget"] in ("1", "1/4", "learned")}
    budget = cells["full"]["bytes"] // 4
    deeplight = cells["deeplight"]
    dedup = cells.get("dedup") or cells[RELAXED_DEDUP]
    assert dedup["method"] == ("dedup" if dedup["duplicates"] else RELAXED_DEDUP)  # labelled for what it did
    assert deeplight["bytes"] == deeplight["export_csr_bytes"] <= deeplight["budget_bytes"] == budget
    assert 0 < deeplight["learned_element_sparsity"] <= deeplight["target_sparsity"] < 1  # pruned while training
    assert deeplight["element_sparsity"] >= deeplight["target_sparsity"] - 0.01
    assert 0.5 * budget <= dedup["bytes"] <= dedup["budget_bytes"] == budget
    assert dedup["duplicates"] + dedup["relaxed_merges"] == sum(20 - m["blocks"] for m in dedup["merges"].values())
    assert dedup["test_auc"] > 0.5 and deeplight["test_auc"] > 0.5
    autosrh, learned = cells["autosrh"], cells["autosrh (learned)"]
    assert autosrh["bytes"] == autosrh["export_csr_bytes"] <= autosrh["budget_bytes"] == budget
    assert autosrh["threshold_moved"] > 0 and learned["budget"] == "learned"
    # AutoDim at width 8: 1/4 is below every table at width 4 (20 of 36 bytes a row); 3/4 fits
    assert "below AutoDim's smallest result, every table at its narrowest" in cells["autodim"]["unreachable"]
    half = next(c for c in saved if c["method"] == "autodim" and c["budget"] == "3/4")
    assert half["bytes"] <= half["budget_bytes"] and set(half["widths"].values()) <= {4, 8}
    assert set(cells["autodim (learned)"]["widths"].values()) <= {4, 8}
