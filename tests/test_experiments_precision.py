"""experiments.precision end to end on tiny synthetic data: every variant runs and exports."""

import json

import pytest

from experiments.precision import main

TINY = """
[data]
name = "synthetic"
num_samples = 3000
num_fields = 4
cardinalities = 300
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
"""


def test_precision_runs_every_variant_and_qat_exports_reproduce_their_auc(tmp_path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    main(["--config", str(config), "--seeds", "0", "--bits", "4", "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "precision.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    expected = {"fp32", "ptq@fp16", "ptq@int8", "ptq@int4", "ptq@int2", "fp16-nearest", "fp16-stochastic"}
    assert set(rows) == expected | {"lpt@int4", "alpt@int4"}
    for name in ("lpt@int4", "alpt@int4"):
        assert rows[name]["exported_auc"] == pytest.approx(rows[name]["test_auc"], abs=2e-3)
    assert rows["ptq@int4"]["served_bytes"] < rows["ptq@int8"]["served_bytes"] < rows["fp32"]["served_bytes"]
    assert [s["variant"] for s in result["summary"]] == list(rows)
