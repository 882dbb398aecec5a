"""Does giving the most frequent ids exclusive rows help a hashed table at the same byte budget?

    python -m experiments.frequency_hybrid --budget 1/4 --hot-share 0.1 --seeds 3 --out results/frequency_hybrid

For each seed, the hashing trick is sized to the budget twice: pure hashing, and the hybrid whose
tables each give their `hot-share` most frequent ids (counted on the training split) exclusive rows.
Both train with the protocol of `experiments.ctr` and the same config.
"""

from __future__ import annotations

import statistics
from fractions import Fraction
from pathlib import Path
from typing import Any

from data import load_dataset
from embtab.methods.frequency import hottest_ids
from experiments.common import parser, write_json
from experiments.ctr import load_config, run
from experiments.sweep import config_full_bytes


def hybrid_overrides(config: dict[str, Any], hot_share: float) -> dict[str, dict[str, Any]]:
    """Per table, the hashing trick with its `hot_share` most frequent training ids kept exclusive."""
    data = dict(config["data"])
    splits = load_dataset(data.pop("name"), **data)
    counts = splits.id_counts()
    return {
        table: {
            "name": "hashing_trick",
            "rows": 64,
            "hot_ids": list(hottest_ids(found, int(hot_share * len(found)))),
        }
        for table, found in counts.items()
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0], "results/frequency_hybrid")
    p.add_argument("--config", default="experiments/configs/din_movielens.toml")
    p.add_argument("--budget", default="1/4", help="fraction of the full table's bytes")
    p.add_argument("--hot-share", type=float, default=0.1, help="share of each table's ids kept exclusive")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    base = load_config(args.config, [], {})
    budget = int(config_full_bytes(base) * Fraction(args.budget))
    variants = {"hashing": {}, "hybrid": hybrid_overrides(base, args.hot_share)}
    results: dict[str, list[float]] = {name: [] for name in variants}
    out = Path(args.out)
    for seed in range(args.seeds):
        for name, overrides in variants.items():
            embedding = {
                **base["embedding"],
                "budget_bytes": budget,
                "method": {"name": "hashing_trick"},
                "table_methods": overrides,
            }
            config = {
                **base,
                "embedding": embedding,
                "train": {**base["train"], "seed": 2024 + seed, "progress": False},
            }
            results[name].append(run(config, out / f"{name}_seed{seed}")["test_auc"])
    summary = {
        name: {"test_auc": aucs, "mean": statistics.mean(aucs), "std": statistics.pstdev(aucs)}
        for name, aucs in results.items()
    }
    for name, row in summary.items():
        print(f"{name:8s} test AUC {row['mean']:.4f} ± {row['std']:.4f} over {args.seeds} seeds")
    write_json(
        out / "summary.json",
        {"budget": args.budget, "budget_bytes": budget, "hot_share": args.hot_share, "results": summary},
    )


if __name__ == "__main__":
    main()
