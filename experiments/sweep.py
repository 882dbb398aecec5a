"""Memory-budget sweep: every method at the same budgets, one results table, one Pareto plot.

    python -m experiments.sweep --config experiments/configs/din_movielens.toml --budgets 1/2 1/4 1/16 1/64 --seeds 3 --out results/sweep

Methods: every registered method with a size knob or fixed bytes (each sized per table by
`embtab.budget`), MDE, the hot-id variants (``hashing_trick+hot``, ``multi_hash+hot``: each table's
hottest training ids, ``--hot-share`` of its rows, get exclusive rows and the rest hash, as the
VLDB benchmark's AdaptEmb), and the learned-size and staged methods ``optembed``, ``pep``, ``dnis``,
``deeplight``, ``dedup``, ``autosrh`` and ``autodim``, whose
stages (search, budget fit, retrain) run inside one cell per seed (`experiments.search`) and give
two kinds of rows: the method's own learned result (``optembed (learned)``: no budget shift) and
its budget-fitted variant (``optembed``). ``dpq`` and ``mgqe`` train a full query table plus a
codebook and are compressed only at export (codes + codebook): one cell per seed, charged its
export's bytes, recorded at its own export size and at any budget that fixed size fills (other
budgets: unreachable, with the size it has). Every model trains with the protocol of
`experiments.ctr` (same split, epochs with early stopping on validation, optimizer settings).

Budgets: ``1/16`` is a fraction of the full table's bytes (weights + fused optimizer state),
``p1/16`` a VLDB-style parameter ratio (parameters kept / full parameters, no optimizer state),
``1048576B`` bytes. Every row records both accountings (``bytes``, ``parameter_ratio``) and the
cell's wall time. A budget a method cannot reach is recorded as unreachable with the reason.

Precision: ``NAME@fp16`` stores the method's tables in fp16 (sized at 2 bytes per weight);
``NAME@int8`` / ``@int4`` / ``@int2`` trains them quantization-aware at that width
(`embtab.quant.spec.DEFAULT_QAT`), sizes them to the same budget counted in the bytes fbgemm's
IntN kernels serve (width 16: 20 / 12 / 8 B per row, fp16 scale and bias included), and tests the
exported model. Such a row's ``bytes`` are the served bytes (``bytes_counted = "served int4"``),
``train_bytes`` the training allocation (fp32 grid, optimizer and QAT state), ``qat_test_auc`` the
QAT model's own evaluation.

Finished cells are skipped on a re-run, so a killed sweep loses at most the cells in progress; a
finished cell keeps its rows, not its checkpoints. ``--report-only`` writes the outputs of the
cells finished so far and trains nothing. Writes `results.parquet`, `results.csv`,
`summary.md` and `pareto.png` to the output folder.

    torchrun --nproc_per_node 2 -m experiments.sweep --distributed --threads 1 --config ... --out ...

With `--distributed` every sized cell is trained by all ranks together (tables sharded as the
config's [sharding] table says); learned-size cells run on rank 0 alone; rank 0 writes every file.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import torch.distributed as dist
from tqdm import tqdm

from embtab.files import atomic_write_text
from embtab.budget import BudgetError
from experiments.common import is_writer, join_torchrun, parser
from experiments.ctr import SECTIONS, load_config, run
from experiments.trainer import BEST, CHECKPOINT

if TYPE_CHECKING:
    from embtab import EmbeddingSpec

DEFAULT_BUDGETS = ("1", "1/2", "1/4", "1/16", "1/64", "1/256")
LEARNED = ("optembed", "pep", "dnis", "deeplight", "dedup", "autosrh", "autodim")
EXPORTED = ("dpq", "mgqe")  # train a full query table + codebook; compressed only at export
EXPORT = "export"
MGQE_HOT_SHARE = 0.1  # share of each table's ids (the most frequent in training) MGQE gives every codeword
HOT = "+hot"
HOT_METHODS = ("hashing_trick", "multi_hash")
RESULT = "cell.json"
ALL_BUDGETS = "all"
DETAILS = (
    "threshold_moved", "learned_rows_pruned", "learned_element_sparsity", "element_sparsity", "rows_pruned",
    "search_s", "search_epochs", "reached_at_epoch", "int8_test_auc", "export_csr_bytes", "train_bytes",
    "target_sparsity", "duplicates", "relaxed_merges",
)


@dataclass(frozen=True)
class Cell:
    """One unit of work: a sized method at one budget and seed, or a learned-size method's
    stages for every budget of one seed (``budget == "all"``)."""

    method: str
    budget: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}__{self.budget.replace('/', 'over')}__seed{self.seed}"


@dataclass(frozen=True)
class Budget:
    """A budget as given: ``kind`` is "bytes" (a fraction of the full bytes, or absolute bytes)
    or "parameters" (a parameter ratio)."""

    text: str

    @property
    def kind(self) -> str:
        return "parameters" if self.text.startswith("p") else "bytes"

    @property
    def fraction(self) -> Fraction | None:
        """The fraction of the full table (bytes or parameters), None for absolute bytes."""
        if self.text.endswith("B"):
            return None
        return Fraction(self.text[1:] if self.kind == "parameters" else self.text)

    def bytes(self, full_bytes: int) -> int:
        return int(full_bytes * self.fraction) if self.fraction is not None else int(self.text[:-1])


def budget_fraction(text: str) -> Fraction | None:
    """A budget's fraction of the full table ('1/16', 'p1/16'), or None for bytes ('1048576B')."""
    return Budget(text).fraction


def cell_config(base: dict[str, Any], cell: Cell, full_bytes: int, params: dict[str, Any]) -> dict[str, Any]:
    """The experiments.ctr config of a sized cell (its method, budget, seed and precision:
    ``hashing_trick@fp16`` trains its tables in fp16; ``hashing_trick@int4`` trains them
    quantization-aware at 4 bits (`embtab.quant.spec.DEFAULT_QAT`), is sized to the budget in the
    bytes served at int4, and is tested through the int4 export)."""
    config = {k: copy.deepcopy(v) for k, v in base.items() if k in SECTIONS}
    budget = Budget(cell.budget)
    label, _, precision = cell.method.partition("@")
    method = label.removesuffix(HOT)
    config["embedding"]["method"] = {"name": method, **params.get(method, {})}
    settings = precision_settings(precision)
    if "low_precision" in settings:  # the base config's QAT settings (e.g. its grid's reach) apply
        settings["low_precision"] = {**config["embedding"].get("low_precision", {}), **settings["low_precision"]}
    config["embedding"].update(settings)
    if budget.kind == "parameters":
        config["embedding"]["budget_parameter_ratio"] = float(budget.fraction)  # type: ignore[arg-type]
    elif method != "full" or budget.fraction != 1:
        config["embedding"]["budget_bytes"] = budget.bytes(full_bytes)
    config["train"] = {**config.get("train", {}), "seed": cell.seed, "progress": False}
    return config


def precision_settings(precision: str) -> dict[str, Any]:
    """[embedding] settings of a method entry's ``@precision`` suffix ("" or fp32: none)."""
    from embtab.quant.export import BITS
    from embtab.quant.precision import check_served_precision
    from embtab.quant.spec import DEFAULT_QAT

    if precision in ("", "fp32"):
        return {}
    check_served_precision(precision, "sweep method suffix @")
    if precision == "fp16":
        return {"precision": "fp16"}
    return {"low_precision": {"qat": DEFAULT_QAT, "bits": BITS[precision]}, "export_precision": precision}


def hot_overrides(config: dict[str, Any], hot_share: float) -> dict[str, dict[str, Any]]:
    """Per table, the method with its hottest training ids exclusive, taking `hot_share` of the
    rows the plain method gets at this budget (AdaptEmb-style; a multi-hash id takes a row per
    probe); the solver then sizes the hashed rest so that the table keeps its share of the budget."""
    from data import load_dataset
    from embtab.methods import FullTable, MultiHash
    from embtab.methods.frequency import hottest_ids
    from experiments.ctr import embedding_spec, train_config

    data = dict(config["data"])
    splits = load_dataset(data.pop("name"), **data)
    plain = embedding_spec(config["embedding"], splits, train_config(config.get("train", {})).sparse())
    counts = splits.id_counts()
    method = config["embedding"]["method"]
    overrides = {}
    for table, sized in plain.table_methods:
        if isinstance(sized, FullTable):  # left full: too small to gain
            continue
        probes = sized.hashes if isinstance(sized, MultiHash) else 1  # each probe gives a hot id a row
        hot = int(hot_share * sized.rows / probes)
        overrides[table] = {**method, "rows": sized.rows, "hot_ids": list(hottest_ids(counts[table], hot))}
    return overrides


@dataclass(frozen=True)
class Setting:
    """What every cell of one sweep shares (picklable: spawned workers get it whole).

    Attributes:
        base: the sweep's experiments.ctr config (its data, model, train and embedding sections).
        full_bytes: the full table's bytes, which the budgets are fractions of.
        params: per-method spec parameters (``[method_params]``).
        out: the sweep's folder; a cell's files go under ``cells/<cell name>``.
        threads: torch threads per cell.
        hot_share: share of a table's rows the +hot variants give hot ids.
        budgets: every budget of the sweep (the learned-size and export cells report each).
    """

    base: dict[str, Any]
    full_bytes: int
    params: dict[str, Any]
    out: Path
    threads: int
    hot_share: float
    budgets: list[str]

    def folder(self, cell: Cell) -> Path:
        return cell_folder(self.out, cell)

    def config(self, cell: Cell) -> dict[str, Any]:
        """The experiments.ctr config of `cell`, with the sweep's threads."""
        config = cell_config(self.base, cell, self.full_bytes, self.params)
        config["train"]["threads"] = self.threads
        return config


def run_cell(setting: Setting, cell: Cell, process_group: dist.ProcessGroup | None = None) -> list[dict[str, Any]]:
    """Run one cell (in a worker process when --jobs > 1, on every rank when distributed) and
    record its rows."""
    folder = setting.folder(cell)
    start = time.perf_counter()
    if cell.budget == ALL_BUDGETS:
        rows = _learned_rows(setting, cell, folder) if is_writer() else []
    elif cell.budget == EXPORT:
        rows = _export_rows(setting, cell, folder, process_group)
    else:
        rows = [_sized_row(setting, cell, folder, process_group)]
    for row in rows:
        row["wall_seconds"] = time.perf_counter() - start
    if is_writer():
        _record(folder, rows)
    if process_group is not None:
        dist.barrier(process_group)
    return rows


def _sized_row(
    setting: Setting, cell: Cell, folder: Path, process_group: dist.ProcessGroup | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"method": cell.method, "budget": cell.budget, "seed": cell.seed}
    config = setting.config(cell)
    try:
        if cell.method.partition("@")[0].endswith(HOT):
            config["embedding"]["table_methods"] = hot_overrides(config, setting.hot_share)
        summary = run(config, folder, process_group=process_group)
    except BudgetError as error:
        return {**row, "status": "unreachable", "reason": str(error)}
    budget = Budget(cell.budget)
    served = "served_precision" in summary  # an @int<b> entry: sized, and tested, as served
    counted = summary["served_bytes"] if served else summary["embedding_bytes"]
    return {
        **row,
        "status": "ok",
        "parameters_json": json.dumps({"method": summary["method"], "tables": summary["table_methods"]}),
        "budget_bytes": budget.bytes(setting.full_bytes) if budget.kind == "bytes" else None,
        "bytes": counted,
        "bytes_counted": f"served {summary['served_precision']}" if served else "training",
        "train_bytes": summary["embedding_bytes"],
        "served_bytes": summary.get("served_bytes"),
        "parameters": summary["embedding_parameters"],
        "parameter_ratio": summary["embedding_parameter_ratio"],
        "compression": setting.full_bytes / counted,
        "test_auc": summary["served_test_auc"] if served else summary["test_auc"],
        "test_logloss": summary["served_test_logloss"] if served else summary["test_logloss"],
        "qat_test_auc": summary["test_auc"] if served else None,
        "valid_auc": summary["valid_auc"],
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "train_samples_per_s": summary["train_samples_per_s"],
        "inference_samples_per_s": summary["inference_samples_per_s"],
    }


def _learned_rows(setting: Setting, cell: Cell, folder: Path) -> list[dict[str, Any]]:
    """A learned-size method's stages for every byte budget of the sweep (parameter-ratio budgets
    are recorded as unreachable: their export targets are bytes)."""
    from experiments import search

    config = copy.deepcopy(setting.base)
    config["train"] = {**config.get("train", {}), "threads": setting.threads}
    budgets = [Budget(b) for b in setting.budgets]
    fractions = [b.fraction for b in budgets if b.kind == "bytes" and b.fraction is not None]
    runner = search.Run(config, cell.seed, folder)
    produced = {"optembed": search.run_optembed, "pep": search.run_pep, "dnis": search.run_dnis,
                "deeplight": search.run_deeplight, "dedup": search.run_dedup, "autosrh": search.run_autosrh,
                "autodim": search.run_autodim}[cell.method](
        runner, [f for f in fractions if f < 1]  # type: ignore[misc]
    )
    rows = []
    for cell_row in produced:
        row: dict[str, Any] = {"method": cell_row["method"], "budget": cell_row["budget"], "seed": cell.seed}
        if "test_auc" not in cell_row:
            rows.append({**row, "status": "unreachable", "reason": cell_row["unreachable"]})
            continue
        row.update(
            status="ok",
            parameters_json=json.dumps({"widths": cell_row.get("widths")}),
            budget_bytes=cell_row.get("budget_bytes"),
            bytes=cell_row["bytes"],
            parameters=cell_row["parameters"],
            parameter_ratio=cell_row["parameter_ratio"],
            compression=runner.full_bytes / cell_row["bytes"],
            **{k: cell_row[k] for k in ("test_auc", "test_logloss", "valid_auc", "best_epoch", "epochs_run")},
            **{k: cell_row[k] for k in DETAILS if k in cell_row},
        )
        rows.append(row)
    for budget in budgets:
        if budget.kind == "parameters":
            reason = f"{cell.method} takes byte budgets (its export target), not a parameter ratio"
            row = {"method": cell.method, "budget": budget.text, "seed": cell.seed}
            rows.append({**row, "status": "unreachable", "reason": reason})
    return rows


def _export_rows(
    setting: Setting, cell: Cell, folder: Path, process_group: dist.ProcessGroup | None
) -> list[dict[str, Any]]:
    """DPQ / MGQE: train once (the full query table + codebook: more than the full table's bytes,
    so no budget binds training), then charge the export (bit-packed codes + codebook). The forward
    pass already uses the snapped codewords, so the test AUC is the export's. One row at the
    method's own export size, and one per sweep budget: the same figures where the fixed export
    size fills that budget, otherwise unreachable with the size it has."""
    config = setting.config(Cell(cell.method, "1", cell.seed))
    config["embedding"].pop("budget_bytes", None)
    config["embedding"].pop("budget_min_fill", None)
    full_bytes = setting.full_bytes
    spec = _exported_spec(config)
    if cell.method == "mgqe":
        config["embedding"]["table_methods"] = {
            name: method.to_dict() for name, method in spec.table_methods
        }
    summary = run(config, folder, process_group=process_group)
    export = sum(t.method.build(t).export_bytes() for t in spec.tables())
    full_weight_bytes = 4 * sum(t.cardinality * t.dim for t in spec.tables())
    base_row = {"seed": cell.seed, "method": cell.method}
    measured = {
        "status": "ok",
        "parameters_json": json.dumps({"method": summary["method"], "export": "codes + codebook"}),
        "bytes": export,
        "parameters": summary["embedding_parameters"],
        "parameter_ratio": export / full_weight_bytes,  # float32 parameters' worth of the export
        "compression": full_bytes / export,
        "train_bytes": summary["embedding_bytes"],
        **{k: summary[k] for k in ("test_auc", "test_logloss", "valid_auc", "best_epoch", "epochs_run")},
        "train_samples_per_s": summary["train_samples_per_s"],
        "inference_samples_per_s": summary["inference_samples_per_s"],
    }
    rows = [{**base_row, "budget": EXPORT, **measured}]
    min_fill = setting.base["embedding"].get("budget_min_fill", 0.9)
    for budget_text in setting.budgets:
        budget = Budget(budget_text)
        if budget.kind == "parameters":
            have, limit = measured["parameter_ratio"], float(budget.fraction)  # type: ignore[arg-type]
        else:
            have, limit = export / full_bytes, budget.bytes(full_bytes) / full_bytes
        row = {**base_row, "budget": budget_text}
        if min_fill * limit <= have <= limit:
            rows.append({**row, **measured, "budget_bytes": budget.bytes(full_bytes) if budget.kind == "bytes" else None})
        else:
            reason = (
                f"{cell.method} has one export size: {export} bytes, 1/{full_bytes / export:.1f} of the full "
                f"bytes (p={measured['parameter_ratio']:.3g}); training holds the full query table + codebook "
                f"({summary['embedding_bytes']} bytes)"
            )
            rows.append({**row, "status": "unreachable", "reason": reason})
    return rows


def _exported_spec(config: dict[str, Any]) -> EmbeddingSpec:
    """The spec a DPQ / MGQE cell trains; MGQE's hot ids are each table's `MGQE_HOT_SHARE` most
    frequent training ids."""
    import math

    from data import load_dataset
    from embtab.methods.frequency import hottest_ids
    from experiments.ctr import embedding_spec, train_config

    data = dict(config["data"])
    splits = load_dataset(data.pop("name"), **data)
    spec = embedding_spec(config["embedding"], splits, train_config(config.get("train", {})).sparse())
    if spec.method.name != "mgqe":
        return spec
    counts = splits.id_counts()
    method = config["embedding"]["method"]
    overrides = {
        t.name: {**method, "hot_ids": [int(i) for i in hottest_ids(counts[t.name], math.ceil(MGQE_HOT_SHARE * t.cardinality))]}
        for t in spec.tables()
    }
    return embedding_spec({**config["embedding"], "table_methods": overrides}, splits, train_config(config.get("train", {})).sparse())


def _record(folder: Path, rows: list[dict[str, Any]]) -> None:
    """Write the cell's rows (atomically) and drop its checkpoints."""
    atomic_write_text(folder / RESULT, json.dumps(rows))
    for checkpoint in folder.rglob("*.pt"):
        checkpoint.unlink()
    for checkpoint in (CHECKPOINT, BEST):
        (folder / checkpoint).unlink(missing_ok=True)


def config_full_bytes(base: dict[str, Any]) -> int:
    """Bytes of the full table (weights + optimizer state) for the configured data and width."""
    from data import load_dataset
    from embtab.budget import full_table_bytes
    from experiments.ctr import embedding_spec, train_config

    data = dict(base["data"])
    splits = load_dataset(data.pop("name"), **data)
    optimizer = train_config(base.get("train", {})).sparse()
    embedding = {"dim": base["embedding"].get("dim", 16), "method": {"name": "full"}}
    return full_table_bytes(embedding_spec(embedding, splits, optimizer), optimizer)


def cell_folder(out: Path, cell: Cell) -> Path:
    """Where a sweep in `out` keeps `cell`'s files."""
    return out / "cells" / cell.name


def finished(out: Path, cell: Cell) -> list[dict[str, Any]] | None:
    path = cell_folder(out, cell) / RESULT
    return json.loads(path.read_text()) if path.exists() else None


def sweep(
    base: dict[str, Any],
    cells: list[Cell],
    params: dict[str, Any],
    out: Path,
    jobs: int,
    threads: int,
    hot_share: float = 0.5,
    budgets: list[str] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> pl.DataFrame:
    budgets = budgets or sorted({c.budget for c in cells if c.budget != ALL_BUDGETS})
    setting = Setting(base, config_full_bytes(base), params, out, threads, hot_share, budgets)
    done = {c: finished(out, c) for c in cells}
    rows = [r for c in cells for r in (done[c] or [])]
    todo = [c for c in cells if done[c] is None]
    progress = tqdm(
        total=len(cells), initial=len(cells) - len(todo), unit="cell", desc="sweep", disable=not is_writer()
    )
    if jobs > 1:
        # Spawned, not forked: a forked worker would inherit this process's gloo group.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_cell, setting, c) for c in todo]
            for future in futures:
                rows += future.result()
                progress.update(1)
    else:
        for cell in todo:
            rows += run_cell(setting, cell, process_group)
            progress.update(1)
    progress.close()
    return pl.DataFrame(rows, infer_schema_length=None)


def _stats(results: pl.DataFrame) -> pl.DataFrame:
    ok = results.filter(pl.col("status") == "ok")
    return ok.group_by("method", "budget").agg(
        pl.col("test_auc").mean().alias("auc"),
        pl.col("test_auc").std().fill_null(0.0).alias("std"),
        pl.col("bytes").mean().alias("bytes"),
        pl.col("parameter_ratio").mean().alias("ratio"),
        pl.col("wall_seconds").mean().alias("seconds"),
    )


def summarize(results: pl.DataFrame) -> str:
    """Markdown: test AUC mean ± std over seeds per method and budget (bytes and parameter ratio
    beside it), the best per budget in bold, then the winner of each budget. A configuration with
    more parameters than the full table (a learned size that pruned nothing) is not ranked."""
    stats = _stats(results)
    budgets = sorted(results["budget"].unique().to_list(), key=_budget_order)
    methods = sorted(results["method"].unique().to_list())
    compressed = pl.col("ratio").fill_null(0.0) <= 1.0
    best = {
        b: stats.filter((pl.col("budget") == b) & compressed).sort("auc", descending=True)["method"].head(1).to_list()
        for b in budgets
    }
    lines = [
        "| method | " + " | ".join(_budget_title(b) for b in budgets) + " |",
        "|---" * (len(budgets) + 1) + "|",
    ]
    for method in methods:
        cells = []
        for b in budgets:
            hit = stats.filter((pl.col("method") == method) & (pl.col("budget") == b))
            if hit.height == 0:
                present = results.filter((pl.col("method") == method) & (pl.col("budget") == b)).height
                cells.append("unreachable" if present else "")
                continue
            text = (
                f"{hit['auc'][0]:.4f} ± {hit['std'][0]:.4f} ({_size(hit['bytes'][0])}, "
                f"p={hit['ratio'][0]:.3g}, {hit['seconds'][0]:.0f} s)"
            )
            cells.append(f"**{text}**" if best[b] == [method] else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    winners = [f"{_budget_title(b)}: {best[b][0]}" for b in budgets if best[b]]
    return (
        "\n".join(lines)
        + "\n\nTest AUC, mean ± std over seeds (bytes allocated: weights + optimizer state, or the CSR "
        "export for PEP, codes + codebook for DPQ and MGQE; NAME@int<b>: trained quantization-aware, sized "
        "and tested as served by fbgemm's INT<b> kernels, bytes served; p: parameters kept / full parameters; "
        "wall seconds per cell).\n\n"
        + "Best per budget: "
        + "; ".join(winners)
        + "\n"
        + _learned_summary(results)
    )


def _learned_summary(results: pl.DataFrame) -> str:
    """Markdown: what each learned-size method learned by itself (means over seeds)."""
    columns = [c for c in ("threshold_moved", "learned_rows_pruned", "learned_element_sparsity", "search_epochs",
                           "reached_at_epoch", "search_s") if c in results.columns]
    learned = results.filter(pl.col("method").str.contains("learned") & (pl.col("status") == "ok"))
    if learned.height == 0 or not columns:
        return ""
    stats = learned.group_by("method", "budget").agg(
        pl.col("parameter_ratio").mean(), pl.col("test_auc").mean(), *[pl.col(c).mean() for c in columns]
    ).sort("method", "budget")
    header = ["method", "budget", "test AUC", "parameter ratio", *columns]
    lines = ["", "Learned by the methods themselves (no budget shift; means over seeds):", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in stats.iter_rows(named=True):
        values = [row["method"], row["budget"], f"{row['test_auc']:.4f}", f"{row['parameter_ratio']:.3g}"]
        values += ["-" if row[c] is None else f"{row[c]:.3g}" for c in columns]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _budget_title(text: str) -> str:
    if text == "learned":
        return "own learned size"
    if text == EXPORT:
        return "own export size"
    budget = Budget(text)
    if budget.fraction is None:
        return text
    return f"{text[1:]} of full parameters" if budget.kind == "parameters" else f"{text} of full bytes"


def _budget_order(text: str) -> tuple[int, float]:
    if text == "learned":
        return (2, 0.0)
    if text == EXPORT:
        return (3, 0.0)
    budget = Budget(text)
    value = float(budget.fraction) if budget.fraction is not None else float(text[:-1])
    return (0 if budget.kind == "bytes" else 1, -value)


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

    stats = _stats(results)
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors
    for index, method in enumerate(sorted(stats["method"].unique().to_list())):
        part = stats.filter(pl.col("method") == method).sort("bytes")
        if method == "full":
            ax.axhline(part["auc"].max(), color="black", linestyle="--", linewidth=1, label="full table")
            continue
        ax.errorbar(
            part["bytes"].to_list(),
            part["auc"].to_list(),
            yerr=part["std"].to_list(),
            marker="os^vD<>ph*"[index % 10],
            color=colors[index % len(colors)],
            linestyle=":" if "(learned)" in method else "-",
            capsize=3,
            label=method,
        )
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes (weights + optimizer state; element-sparse exports as CSR)")
    ax.set_ylabel("test AUC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
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


def _budgets_of(method: str, budgets: list[str]) -> list[str]:
    """The budgets a method's cells take: the full table (at any precision) is the reference at its
    own size (1), a learned-size method one cell for every budget."""
    if method in LEARNED:
        return [ALL_BUDGETS]
    if method in EXPORTED:
        return [EXPORT]
    return ["1"] if method.partition("@")[0] == "full" else budgets


def default_methods() -> list[str]:
    """Every method the sweep knows: sized ones, MDE, the hot-id variants, the learned ones, the
    export-compressed ones."""
    from embtab.methods import METHODS

    return sorted(METHODS) + ["mde"] + [m + HOT for m in HOT_METHODS] + list(LEARNED) + list(EXPORTED)


def main() -> None:
    p = parser(__doc__.splitlines()[0], "results/sweep")
    p.add_argument("--config", help="base TOML config (as for experiments.ctr; [search] for learned sizes)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--dataset")
    p.add_argument("--model")
    p.add_argument("--epochs", type=int)
    p.add_argument(
        "--methods",
        nargs="+",
        help="default: every method (see the module docstring); NAME@fp16 stores its tables in fp16, "
        "NAME@int8 / @int4 / @int2 trains quantization-aware and is sized and tested as served at that precision",
    )
    p.add_argument(
        "--budgets",
        nargs="+",
        default=list(DEFAULT_BUDGETS),
        help="fractions of the full table's bytes (1/16), parameter ratios (p1/16) or bytes (1048576B)",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--min-fill", type=float, default=0.9, help="a cell must use at least this share of its budget"
    )
    p.add_argument(
        "--hot-share", type=float, default=0.5, help="share of a table's rows the +hot variants give hot ids"
    )
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="threads per cell")
    p.add_argument("--distributed", action="store_true", help="train each cell over the ranks torchrun starts")
    p.add_argument("--report-only", action="store_true", help="write the outputs of the finished cells; train none")
    args = p.parse_args()
    if args.distributed and args.jobs > 1:
        raise SystemExit("--distributed trains one cell at a time over all ranks; drop --jobs")
    base = load_config(
        args.config,
        args.set,
        {"dataset": args.dataset, "model": args.model, "epochs": args.epochs},
        sections=(*SECTIONS, "search", "method_params"),
    )
    known = default_methods()
    methods = args.methods or known
    unknown = sorted({m.partition("@")[0] for m in methods} - set(known))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {known}")
    for method in methods:
        name, _, precision = method.partition("@")
        if precision and name in LEARNED:
            raise SystemExit(f"--methods {method}: a learned-size method takes no @precision (its budget is its export target)")
        try:
            precision_settings(precision)
        except ValueError as error:
            raise SystemExit(f"--methods {method}: {error}") from None
    params = base.pop("method_params", {})
    base["embedding"]["budget_min_fill"] = args.min_fill
    first_seed = base.get("train", {}).get("seed", 2024)
    cells = [  # seed by seed, so that a sweep stopped early has every method for its first seeds
        Cell(m, b, first_seed + s)
        for s in range(args.seeds)
        for m in methods
        for b in _budgets_of(m, args.budgets)
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    group = join_torchrun(base.get("train", {}).get("device", "cpu")) if args.distributed else None
    if args.report_only:
        cells = [c for c in cells if finished(out, c) is not None]
    results = sweep(base, cells, params, out, args.jobs, args.threads, args.hot_share, list(args.budgets), group)
    if is_writer():
        print(write_outputs(results, out))
        print(f"wrote {out}/results.parquet, results.csv, summary.md, pareto.png")
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
