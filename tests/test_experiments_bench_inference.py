"""The inference benchmark runs end to end on a tiny configuration and writes its table."""

import json

from experiments.bench_inference import main


def test_bench_inference_writes_bytes_and_ratios(tmp_path) -> None:
    out = tmp_path / "bench.json"
    main(
        [
            "--out", str(out), "--methods", "full", "hashing_trick", "--precisions", "fp32", "int4",
            "--fields", "3", "--rows", "400", "--batch", "64", "--steps", "2", "--rounds", "2",
        ]
    )
    rows = {r["contender"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"full@fp32", "full@int4", "hashing_trick@fp32", "hashing_trick@int4"}
    assert rows["full@fp32"]["ratio_to_full_fp32"] == 1.0
    assert rows["full@int4"]["bytes"] == 3 * -(-400 * 12 // 128) * 128  # 12-byte rows, 128-byte tables
    assert rows["hashing_trick@int4"]["compression"] > rows["hashing_trick@fp32"]["compression"] > 10
