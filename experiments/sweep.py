"""Memory-budget sweep: every method at the same byte budgets, one results table, a Pareto plot.

    python -m experiments.sweep --dataset movielens --model din --budgets 1/4 1/16 --seeds 1 --out results/sweep

Each cell (method x budget x seed) trains and evaluates with the protocol of `experiments.ctr`
(same split, early stopping and optimizer settings). A cell whose method cannot reach a budget is
recorded as unreachable with the reason. Finished cells are skipped on a re-run, so a killed sweep
loses at most the cells in progress; a finished cell keeps its row and metrics, not its
checkpoints. Writes `results.parquet`, `results.csv`, `summary.md` and `pareto.png` to the output
folder.

    torchrun --nproc_per_node 2 -m experiments.sweep --distributed --threads 1 --config ... --out ...

With `--distributed` every cell is trained by all ranks together (tables sharded as the config's
[sharding] table says); rank 0 writes every file.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import polars as pl
import torch.distributed as dist
from tqdm import tqdm

from experiments.common import is_writer, join_torchrun, parser
from experiments.ctr import load_config, run
from experiments.engine import BEST, CHECKPOINT

DEFAULT_BUDGETS = ("1", "1/2", "1/4", "1/16", "1/64", "1/256")
RESULT = "cell.json"


@dataclass(frozen=True)
class Cell:
    """One training run of the sweep."""

    method: str
    budget: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}__{self.budget.replace('/', 'over')}__seed{self.seed}"


def budget_fraction(text: str) -> Fraction | None:
    """A budget given as a fraction of the full table's bytes ('1/16'), or None for bytes ('1048576B')."""
    return None if text.endswith("B") else Fraction(text)


def cell_config(base: dict[str, Any], cell: Cell, full_bytes: int, params: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(base)
    fraction = budget_fraction(cell.budget)
    budget = int(full_bytes * fraction) if fraction is not None else int(cell.budget[:-1])
    method, _, precision = cell.method.partition("@")  # "hashing_trick@fp16": tables stored in fp16
    config["embedding"]["method"] = {"name": method, **params.get(method, {})}
    if precision:
        config["embedding"]["precision"] = precision
    if cell.method != "full" or fraction != 1:
        config["embedding"]["budget_bytes"] = budget
    config["train"] = {**config.get("train", {}), "seed": cell.seed, "progress": False}
    return config


def run_cell(
    base: dict[str, Any],
    cell: Cell,
    full_bytes: int,
    params: dict[str, Any],
    out: str,
    threads: int,
    process_group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Train one cell (in a worker process when --jobs > 1, on every rank when distributed) and
    record its row."""
    config = cell_config(base, cell, full_bytes, params)
    config["train"]["threads"] = threads
    folder = Path(out) / "cells" / cell.name
    start = time.perf_counter()
    row: dict[str, Any] = {"method": cell.method, "budget": cell.budget, "seed": cell.seed}
    try:
        summary = run(config, folder, process_group=process_group)
    except ValueError as error:
        if "budget" not in str(error):
            raise
        row.update(status="unreachable", reason=str(error))
    else:
        row.update(
            status="ok",
            parameters=json.dumps(summary["method"]),
            budget_bytes=config["embedding"].get("budget_bytes", full_bytes),
            bytes=summary["embedding_bytes"],
            compression=full_bytes / summary["embedding_bytes"],
            fill=summary["embedding_bytes"] / config["embedding"].get("budget_bytes", full_bytes),
            test_auc=summary["test_auc"],
            test_logloss=summary["test_logloss"],
            train_samples_per_s=summary["train_samples_per_s"],
            inference_samples_per_s=summary["inference_samples_per_s"],
        )
    row["wall_seconds"] = time.perf_counter() - start
    if is_writer():
        _record(folder, row)
    if process_group is not None:
        dist.barrier(process_group)
    return row


def _record(folder: Path, row: dict[str, Any]) -> None:
    """Write the cell's row (atomically) and drop its checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (RESULT + ".tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, folder / RESULT)
    for checkpoint in (CHECKPOINT, BEST):
        (folder / checkpoint).unlink(missing_ok=True)


def full_table_bytes(base: dict[str, Any]) -> int:
    """Bytes of the full table (weights + optimizer state) for the configured data and width."""
    import embtab
    import torch
    from data import load_dataset
    from experiments.ctr import embedding_spec, train_config

    data = dict(base["data"])
    splits = load_dataset(data.pop("name"), **data)
    embedding = {"dim": base["embedding"].get("dim", 16), "method": {"name": "full"}}
    spec = embedding_spec(embedding, splits, train_config(base.get("train", {})).sparse())
    tables = embtab.EmbeddingTables(spec, device=torch.device("meta"))
    return tables.memory_bytes(train_config(base.get("train", {})).sparse()).total


def finished(out: Path, cell: Cell) -> dict[str, Any] | None:
    path = out / "cells" / cell.name / RESULT
    return json.loads(path.read_text()) if path.exists() else None


def sweep(
    base: dict[str, Any],
    cells: list[Cell],
    params: dict[str, Any],
    out: Path,
    jobs: int,
    threads: int,
    process_group: dist.ProcessGroup | None = None,
) -> pl.DataFrame:
    full_bytes = full_table_bytes(base)
    rows = [r for c in cells if (r := finished(out, c)) is not None]
    todo = [c for c in cells if finished(out, c) is None]
    progress = tqdm(
        total=len(cells), initial=len(cells) - len(todo), unit="cell", desc="sweep", disable=not is_writer()
    )
    if jobs > 1:
        # Spawned, not forked: a forked worker would inherit this process's gloo group.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_cell, base, c, full_bytes, params, str(out), threads) for c in todo]
            for future in futures:
                rows.append(future.result())
                progress.update(1)
    else:
        for cell in todo:
            rows.append(run_cell(base, cell, full_bytes, params, str(out), threads, process_group))
            progress.update(1)
    progress.close()
    return pl.DataFrame(rows, infer_schema_length=None)


def summarize(results: pl.DataFrame) -> str:
    """Markdown: test AUC mean +- std over seeds per method and budget, best per budget in bold."""
    ok = results.filter(pl.col("status") == "ok")
    stats = ok.group_by("method", "budget").agg(
        pl.col("test_auc").mean().alias("auc"),
        pl.col("test_auc").std().fill_null(0.0).alias("std"),
        pl.col("bytes").mean().alias("bytes"),
        pl.col("train_samples_per_s").mean().alias("speed"),
    )
    budgets = sorted(results["budget"].unique().to_list(), key=_budget_order)
    methods = sorted(results["method"].unique().to_list())
    best = {
        b: stats.filter(pl.col("budget") == b).sort("auc", descending=True)["method"].head(1).to_list()
        for b in budgets
    }
    lines = [
        "| method | "
        + " | ".join(f"{b} of full" if budget_fraction(b) is not None else b for b in budgets)
        + " |",
        "|---" * (len(budgets) + 1) + "|",
    ]
    for method in methods:
        cells = []
        for b in budgets:
            hit = stats.filter((pl.col("method") == method) & (pl.col("budget") == b))
            if hit.height == 0:
                cells.append("unreachable")
                continue
            text = f"{hit['auc'][0]:.4f} ± {hit['std'][0]:.4f} ({_size(hit['bytes'][0])})"
            cells.append(f"**{text}**" if best[b] == [method] else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nTest AUC, mean ± std over seeds (real bytes: weights + optimizer state).\n"


def _budget_order(text: str) -> float:
    fraction = budget_fraction(text)
    return -float(fraction) if fraction is not None else -float(text[:-1])


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def pareto_plot(results: pl.DataFrame, path: Path) -> None:
    """Test AUC against bytes (log axis), one line per method, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = results.filter(pl.col("status") == "ok")
    stats = ok.group_by("method", "budget").agg(
        pl.col("bytes").mean(),
        pl.col("test_auc").mean().alias("auc"),
        pl.col("test_auc").std().fill_null(0.0).alias("std"),
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted(stats["method"].unique().to_list()):
        part = stats.filter(pl.col("method") == method).sort("bytes")
        if method == "full":
            ax.axhline(part["auc"].max(), color="black", linestyle="--", linewidth=1, label="full table")
            continue
        ax.errorbar(
            part["bytes"].to_list(),
            part["auc"].to_list(),
            yerr=part["std"].to_list(),
            marker="o",
            capsize=3,
            label=method,
        )
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes (weights + optimizer state)")
    ax.set_ylabel("test AUC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: pl.DataFrame, out: Path) -> str:
    results = results.sort("method", "budget", "seed")
    results.write_parquet(out / "results.parquet")
    results.write_csv(out / "results.csv")
    summary = summarize(results)
    (out / "summary.md").write_text(summary)
    pareto_plot(results, out / "pareto.png")
    return summary


def main() -> None:
    p = parser(__doc__.splitlines()[0], "results/sweep")
    p.add_argument("--config", help="base TOML config (as for experiments.ctr)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--dataset")
    p.add_argument("--model")
    p.add_argument("--epochs", type=int)
    p.add_argument("--methods", nargs="+", help="default: every registered method; NAME@fp16 stores its tables in fp16")
    p.add_argument(
        "--budgets",
        nargs="+",
        default=list(DEFAULT_BUDGETS),
        help="fractions of the full table (1/16) or bytes (1048576B)",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--min-fill", type=float, default=0.9, help="a cell must use at least this share of its budget"
    )
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="threads per cell")
    p.add_argument("--distributed", action="store_true", help="train each cell over the ranks torchrun starts")
    args = p.parse_args()
    if args.distributed and args.jobs > 1:
        raise SystemExit("--distributed trains one cell at a time over all ranks; drop --jobs")
    from embtab.methods import METHODS

    base = load_config(
        args.config, args.set, {"dataset": args.dataset, "model": args.model, "epochs": args.epochs}
    )
    methods = args.methods or sorted(METHODS)
    unknown = sorted({m.partition("@")[0] for m in methods} - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; registered: {sorted(METHODS)}")
    params = base.pop("method_params", {})
    base["embedding"]["budget_min_fill"] = args.min_fill
    cells = [
        Cell(m, b, base.get("train", {}).get("seed", 2024) + s)
        for m in methods
        for b in args.budgets
        for s in range(args.seeds)
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    group = join_torchrun(base.get("train", {}).get("device", "cpu")) if args.distributed else None
    results = sweep(base, cells, params, out, args.jobs, args.threads, group)
    if is_writer():
        print(write_outputs(results, out))
        print(f"wrote {out}/results.parquet, results.csv, summary.md, pareto.png")
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
