"""bench_offload: a tiny run writes every figure of every cell as JSON."""

from __future__ import annotations

import json

import experiments  # noqa: F401  (OpenMP wait policy and malloc settings, as the command has them)

from experiments import bench_offload

FIGURES = {
    "samples_per_s", "in_memory_samples_per_s", "ratio_to_in_memory", "hit_rate", "bytes_moved_per_step",
    "wait_ms_per_step", "stalls", "timed_steps", "peak_rss_bytes", "cell_peak_rss_bytes", "rss_anon_bytes", "rss_file_bytes", "major_faults", "caches", "store_bytes",
}  # fmt: skip


def test_a_quick_run_writes_every_cell(tmp_path, one_thread):
    out = tmp_path / "offload.json"
    argv = ["--quick", "--caches", "0.1", "--policies", "lru,lookahead", "--rows", "5000", "--out", str(out)]
    bench_offload.main(argv)
    result = json.loads(out.read_text())
    assert set(result["cells"]) == {"zipf1.05/cache0.1", "criteo/cache0.1"}
    for per_policy in result["cells"].values():
        assert set(per_policy) == {"lru", "lookahead"}
        for cell in per_policy.values():
            assert set(cell) == FIGURES
            assert cell["samples_per_s"] > 0 and cell["ratio_to_in_memory"] > 0
            assert 0 <= cell["hit_rate"] <= 1 and cell["bytes_moved_per_step"] > 0
            assert cell["timed_steps"] == 2 * 3 and cell["peak_rss_bytes"] > 0
    assert set(result["best_policy"]["by_ratio_to_in_memory"]) == set(result["cells"])
    assert set(result["best_policy"]["by_hit_rate"]) == set(result["cells"])
    assert result["goal"]["ratio_to_in_memory"] == 0.7 and result["goal"]["best_ratio"] > 0


def test_a_cache_too_small_for_one_batch_is_reported_not_raised(tmp_path, one_thread):
    out = tmp_path / "offload.json"
    argv = ["--quick", "--traces", "zipf", "--caches", "0.001", "--policies", "lru", "--out", str(out)]
    bench_offload.main(argv)
    cell = json.loads(out.read_text())["cells"]["zipf1.05/cache0.001"]["lru"]
    assert "cache_rows is 40; expected cache_rows >= the distinct rows of one batch" in cell["error"]
