"""Learned sizes at byte budgets: OptEmbed (supernet, evolution, retrain), PEP (prune, rewind), MDE, DNIS.

    python -m experiments.search --config experiments/configs/search_din_movielens.toml --seeds 3 --out results/search_movielens
    python -m experiments.search --config experiments/configs/search_dlrm_synthetic.toml --seeds 1 --out results/search_synthetic

Per seed: the full table once; OptEmbed's supernet and PEP's thresholded table once (budget-free),
then per budget (a fraction of the full table's bytes, counted with the sparse optimizer's state)
OptEmbed's evolutionary width search under the budget and a fresh retrain of the found rows and
widths, PEP's pruning to the budget and a rewound retrain, MDE sized by `solve_budget`, and DNIS's
dimensions pruned to the budget and fine-tuned (``--methods`` picks; DNIS only when asked). Every
cell reports test AUC, bytes as allocated, rows pruned, widths per table, search and retrain
seconds; OptEmbed and PEP also the test AUC of their int8 export. Prints a table of mean ± std over
seeds and writes everything to ``<out>/result.json``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchmetrics.functional.classification import binary_auroc

import embtab
from data import CTRDataset, DatasetSplits, load_dataset, make_dataloader
from embtab.budget import full_table_bytes, solve_budget
from embtab.methods import DNIS, MDE, PEP, OptEmbed
from embtab.search import EvolutionConfig, evolve
from embtab.search import export as ex
from embtab.shard import embedding_tables_of, physical_weights
from experiments.common import parser, write_json
from experiments.ctr import SECTIONS, load_config, train_config
from experiments.engine import TrainConfig, Trainer
from models import build_model

METHOD_NAMES = ("full", "optembed", "pep", "mde", "dnis")


class Run:
    """One seed's data, settings and the model factory shared by every method."""

    def __init__(self, config: dict[str, Any], seed: int, out: Path) -> None:
        self.config = config
        self.train = replace(train_config(config.get("train", {})), seed=seed, progress=False)
        self.search = dict(config.get("search", {}))
        data = dict(config["data"])
        self.splits: DatasetSplits = load_dataset(data.pop("name"), **data)
        self.features = self.splits.feature_specs()
        self.dim = int(config["embedding"].get("dim", 16))
        self.optimizer = self.train.sparse()
        self.out = out
        self.full_bytes = full_table_bytes(self.spec(embtab.FullTable()), self.optimizer)

    def spec(self, method: embtab.MethodSpec) -> embtab.EmbeddingSpec:
        return embtab.EmbeddingSpec(features=self.features, dim=self.dim, method=method)

    def solved(self, method: embtab.MethodSpec, budget: Fraction) -> embtab.MethodSpec:
        """`method` sized by `solve_budget` for `budget` of the full table's bytes."""
        return solve_budget(self.spec(method), int(self.full_bytes * budget), self.optimizer, min_fill=0).method

    def model(self, tables: embtab.EmbeddingTables) -> nn.Module:
        settings = dict(self.config["model"])
        return build_model(settings.pop("name"), tables, dense_dim=self.splits.dense_dim, **settings)

    def fit(self, tables: embtab.EmbeddingTables, name: str) -> tuple[Trainer, dict[str, Any], float]:
        """Train a model on `tables`; the trainer, its result and the seconds it took."""
        start = time.perf_counter()
        trainer = Trainer(self.model(tables), self.splits, self.train, self.out / name)
        result = trainer.fit()
        return trainer, result, time.perf_counter() - start


def evaluate(model: nn.Module, dataset: CTRDataset, batch_size: int) -> float:
    """Test AUC of a plain (unfused, e.g. int8) model."""
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in make_dataloader(dataset, batch_size, shuffle=False):
            logits.append(model(batch.sparse, batch.dense))
            labels.append(batch.labels)
    return float(binary_auroc(torch.sigmoid(torch.cat(logits)), torch.cat(labels).long()))


def run_full(run: Run) -> list[dict[str, Any]]:
    torch.manual_seed(run.train.seed)
    tables = embtab.EmbeddingTables(run.spec(embtab.FullTable()))
    _, result, seconds = run.fit(tables, "full")
    return [_cell("full", Fraction(1), result["test_auc"], run.full_bytes, run.full_bytes, retrain_s=seconds)]


def run_mde(run: Run, budgets: list[Fraction]) -> list[dict[str, Any]]:
    cells = []
    for budget in budgets:
        target = int(run.full_bytes * budget)
        try:
            method = MDE(alpha=float(run.search.get("mde_alpha", 0.3)))
            min_fill = float(run.search.get("mde_min_fill", 0.5))  # widths move in steps of 4
            fit = solve_budget(run.spec(method), target, run.optimizer, min_fill=min_fill)
        except ValueError as error:
            cells.append({"method": "mde", "budget": str(budget), "unreachable": str(error)})
            continue
        torch.manual_seed(run.train.seed)
        tables = embtab.EmbeddingTables(fit.spec)
        widths = {n: m.width for n, m in tables.methods.items()}
        _, result, seconds = run.fit(tables, f"mde_{_tag(budget)}")
        cells.append(
            _cell("mde", budget, result["test_auc"], run.full_bytes, fit.bytes, widths=widths, retrain_s=seconds)
        )
    return cells


def run_optembed(run: Run, budgets: list[Fraction]) -> list[dict[str, Any]]:
    settings = {k: run.search[k] for k in ("t_lr", "alpha", "sampling") if k in run.search}
    torch.manual_seed(run.train.seed)
    supernet = embtab.EmbeddingTables(run.spec(OptEmbed(**settings)))
    trainer, _, super_s = run.fit(supernet, "optembed_supernet")
    weights = physical_weights(trainer.model)
    tables = embedding_tables_of(trainer.model)[0]
    choices = [m.width_choices for m in tables.methods.values()]  # type: ignore[union-attr]
    config = EvolutionConfig(**{**run.search.get("evolution", {}), "seed": run.train.seed})
    cells = []
    for budget in budgets:
        start = time.perf_counter()
        target, counted = ex.budget_target(run.solved(OptEmbed(**settings), budget))
        fitness = _fitness(trainer, tables, weights, target, counted)
        found = evolve(choices, fitness, config)
        fitness(found.best)  # leave the masks at the best candidate
        evolution_s = time.perf_counter() - start
        table_plans = ex.plans(tables, weights)
        cell = _retrain(run, "optembed", budget, ex.fresh(table_plans))
        cell.update(
            search_s=super_s + evolution_s,
            supernet_s=super_s,
            evolution_s=evolution_s,
            supernet_valid_auc=found.fitness,
            evaluations=len(found.scores),
            thresholds={n: float(m.threshold.detach()) for n, m in tables.methods.items()},  # type: ignore[arg-type]
        )
        cells.append(cell)
    return cells


def _fitness(
    trainer: Trainer,
    tables: embtab.EmbeddingTables,
    weights: dict[str, torch.Tensor],
    budget: int,
    optimizer: embtab.SparseOptimizer | None,
) -> Callable[[tuple[int, ...]], float]:
    """Validation AUC of the supernet with a candidate's widths, pruned to fit `budget`."""
    methods = list(tables.methods.values())

    def fitness(candidate: tuple[int, ...]) -> float:
        for method, width in zip(methods, candidate):
            method.eval_width.fill_(width)  # type: ignore[union-attr,operator]
        ex.set_shift(tables, ex.fit_shift(ex.table_scores(tables, weights), budget, optimizer))
        return trainer.evaluate(trainer.splits.valid).auc

    return fitness


def run_pep(run: Run, budgets: list[Fraction]) -> list[dict[str, Any]]:
    settings = {k: run.search[k] for k in ("granularity", "init_threshold") if k in run.search}
    torch.manual_seed(run.train.seed)
    pep = embtab.EmbeddingTables(run.spec(PEP(**settings)))
    initial = physical_weights(pep)
    trainer, _, search_s = run.fit(pep, "pep_search")
    weights = physical_weights(trainer.model)
    tables = embedding_tables_of(trainer.model)[0]
    ex.set_shift(tables, 0.0)
    learned = ex.plans(tables, weights)
    learned_sparsity = _element_sparsity(learned, run)
    cells = []
    for budget in budgets:
        start = time.perf_counter()
        target, counted = ex.budget_target(run.solved(PEP(**settings), budget))
        ex.set_shift(tables, ex.fit_shift(ex.table_scores(tables, weights), target, counted))
        table_plans = ex.plans(tables, weights)
        fit_s = time.perf_counter() - start
        cell = _retrain(run, "pep", budget, ex.rewind(table_plans, initial))
        cell.update(
            search_s=search_s + fit_s,
            learned_element_sparsity=learned_sparsity,
            element_sparsity=_element_sparsity(table_plans, run),
        )
        cells.append(cell)
    return cells


def run_dnis(run: Run, budgets: list[Fraction]) -> list[dict[str, Any]]:
    """DNIS: train the soft dimension weights with the model, prune columns to the budget, fine-tune."""
    torch.manual_seed(run.train.seed)
    dnis = embtab.EmbeddingTables(run.spec(DNIS()))
    trainer, _, search_s = run.fit(dnis, "dnis_search")
    weights = physical_weights(trainer.model)
    tables = embedding_tables_of(trainer.model)[0]
    cells = []
    for budget in budgets:
        target, counted = ex.budget_target(run.solved(DNIS(), budget))
        try:
            ex.set_shift(tables, ex.fit_shift(ex.table_scores(tables, weights), target, counted))
        except ValueError as error:
            cells.append({"method": "dnis", "budget": str(budget), "unreachable": str(error)})
            continue
        cell = _retrain(run, "dnis", budget, ex.plans(tables, weights))
        cell["search_s"] = search_s
        cells.append(cell)
    return cells


def _element_sparsity(table_plans: dict[str, ex.TablePlan], run: Run) -> float:
    """Share of the full table's elements that are zero (PEP's own measure)."""
    nonzero = sum(int((p.values != 0).sum()) for p in table_plans.values() if p.values is not None)
    total = sum(t.cardinality * run.dim for t in run.spec(embtab.FullTable()).tables())
    return 1 - nonzero / total


def _retrain(run: Run, method: str, budget: Fraction, table_plans: dict[str, ex.TablePlan]) -> dict[str, Any]:
    """Retrain the compact architecture, then export it (fp32 and int8) and test both."""
    torch.manual_seed(run.train.seed)
    spec = run.spec(embtab.FullTable())
    compact = ex.build_compact(spec, table_plans, freeze_zeros=True)
    trained_bytes = compact.memory_bytes(run.optimizer).total
    trainer, result, retrain_s = run.fit(compact, f"{method}_{_tag(budget)}")
    exported = _export(run, trainer, table_plans)
    fp32_auc = evaluate(exported, run.splits.test, run.train.eval_batch_size)
    fp32_bytes = ex.allocated_bytes(exported.embeddings)
    ex.quantize(exported.embeddings)
    int8_auc = evaluate(exported, run.splits.test, run.train.eval_batch_size)
    cardinality = sum(p.keep.numel() for p in table_plans.values())
    cell = _cell(
        method,
        budget,
        result["test_auc"],
        run.full_bytes,
        trained_bytes,
        widths={n: p.width for n, p in table_plans.items()},
        retrain_s=retrain_s,
    )
    cell.update(
        rows_pruned=1 - sum(p.kept for p in table_plans.values()) / cardinality,
        rows_pruned_per_table={n: 1 - p.kept / p.keep.numel() for n, p in table_plans.items()},
        export_fp32_test_auc=fp32_auc,
        export_fp32_bytes=fp32_bytes,
        int8_test_auc=int8_auc,
        int8_bytes=ex.allocated_bytes(exported.embeddings),
    )
    return cell


def _export(run: Run, trainer: Trainer, table_plans: dict[str, ex.TablePlan]) -> nn.Module:
    """The retrained model with inference tables (pooling in the kernel): same weights, same outputs."""
    tables = ex.build_compact(
        run.spec(embtab.FullTable()), ex.trained(table_plans, physical_weights(trainer.model)), freeze_zeros=False
    )
    model = run.model(tables)
    dense = {k: v for k, v in trainer.model.module.state_dict().items() if not isinstance(v, ShardedTensor)}
    unexpected = model.load_state_dict(dense, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"the exported model lacks {unexpected[:3]} of the trained one")
    return model


def _cell(
    method: str,
    budget: Fraction,
    auc: float,
    full_bytes: int,
    bytes_: int,
    widths: dict[str, int] | None = None,
    retrain_s: float = 0.0,
) -> dict[str, Any]:
    return {
        "method": method,
        "budget": str(budget),
        "test_auc": auc,
        "bytes": bytes_,
        "budget_bytes": int(full_bytes * budget),
        "widths": widths,
        "retrain_s": retrain_s,
    }


def _tag(budget: Fraction) -> str:
    return str(budget).replace("/", "_")


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (method, budget)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["method"], cell["budget"]), []).append(cell)
    rows = []
    for (method, budget), group in groups.items():
        done = [c for c in group if "test_auc" in c]
        if not done:
            rows.append({"method": method, "budget": budget, "unreachable": group[0]["unreachable"]})
            continue
        row = {"method": method, "budget": budget, "seeds": len(done)}
        for key in ("test_auc", "int8_test_auc", "rows_pruned", "bytes", "search_s", "retrain_s", "element_sparsity"):
            values = [c[key] for c in done if key in c]
            if values:
                row[key] = statistics.mean(values)
                row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["widths"] = [c["widths"] for c in done]
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| method | budget | test AUC | int8 AUC | rows pruned | KiB | search s | retrain s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "unreachable" in r:
            print(f"| {r['method']} | {r['budget']} | unreachable: {r['unreachable'][:90]} |")
            continue
        int8 = f"{r['int8_test_auc']:.4f}" if "int8_test_auc" in r else "-"
        pruned = f"{100 * r['rows_pruned']:.1f}%" if "rows_pruned" in r else "0%"
        print(
            f"| {r['method']} | {r['budget']} | {r['test_auc']:.4f} ± {r['test_auc_std']:.4f} | {int8} | {pruned} | "
            f"{r['bytes'] / 1024:.1f} | {r.get('search_s', 0):.0f} | {r['retrain_s']:.0f} |"
        )


def main() -> None:
    p = parser(__doc__.splitlines()[0], "results/search")
    p.add_argument("--config", required=True, help="TOML with [data], [model], [embedding], [train], [search]")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--methods", nargs="+", default=list(METHOD_NAMES[:4]), choices=METHOD_NAMES)
    p.add_argument("--budgets", nargs="+", default=["1/4", "1/16"], help="fractions of the full table's bytes")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int)
    args = p.parse_args()
    config = load_config(args.config, args.set, {"epochs": args.epochs}, sections=(*SECTIONS, "search"))
    budgets = [Fraction(b) for b in args.budgets]
    base_seed = train_config(config.get("train", {})).seed
    out = Path(args.out)
    runners = {"full": run_full, "optembed": run_optembed, "pep": run_pep, "mde": run_mde, "dnis": run_dnis}
    cells = []
    for offset in range(args.seeds):
        run = Run(config, base_seed + offset, out / f"seed{base_seed + offset}")
        for name in args.methods:
            produced = runners[name](run) if name == "full" else runners[name](run, budgets)
            for cell in produced:
                cell["seed"] = run.train.seed
                print({k: v for k, v in cell.items() if k not in ("rows_pruned_per_table", "thresholds")}, flush=True)
            cells += produced
            write_json(out / "result.json", {"cells": cells, "summary": summarize(cells), "config": config})
    rows = summarize(cells)
    print_table(rows)
    write_json(out / "result.json", {"cells": cells, "summary": rows, "config": config, "train": asdict(run.train)})


if __name__ == "__main__":
    main()
