"""experiments.search end to end on tiny synthetic data: every method, one budget, one seed."""

import json
import sys

from experiments.search import main

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
