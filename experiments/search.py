"""Learned sizes at byte budgets: OptEmbed (supernet, evolution, retrain), PEP (prune, rewind), MDE, DNIS.

    python -m experiments.search --config experiments/configs/search_din_movielens.toml --seeds 3 --out results/search_movielens
    python -m experiments.search --config experiments/configs/search_dlrm_synthetic.toml --seeds 1 --out results/search_synthetic

Per seed: the full table once; OptEmbed's supernet and PEP's thresholded table once (budget-free),
then per budget (a fraction of the full table's bytes, counted with the sparse optimizer's state)
OptEmbed's evolutionary width search under the budget and a fresh retrain of the found rows and
widths, PEP's pruning to the budget and a rewound retrain, MDE sized by `solve_budget`, and DNIS's
dimensions pruned to the budget and fine-tuned (``--methods`` picks; DNIS only when asked), and,
when asked, the VLDB benchmark's staged methods: DeepLight (pruned while training, per budget),
Dedup (the full table's near-duplicate blocks merged to each budget, fine-tuned), AutoSrh (group x
dimension weights, pruned to each budget, retrained) and AutoDim (a width mixture, the chosen
widths retrained; budgets below every table at width 4 are unreachable). Every
cell reports test AUC, bytes as allocated, rows pruned, widths per table, search and retrain
seconds; OptEmbed and PEP also the test AUC of their int8 export. Prints a table of mean ± std over
seeds and writes everything to ``<out>/result.json``.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import asdict, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchmetrics.functional.classification import binary_auroc

import embtab
from data import CTRDataset, DatasetSplits, load_dataset, make_dataloader
from embtab.budget import BudgetError, full_table_bytes, full_table_parameters, solve_budget, spec_cost
from embtab.methods import DNIS, MDE, PEP, AutoDim, AutoSrh, DeepLight, Dedup, OptEmbed
from embtab.methods.autodim import fit_widths, retrain_method
from embtab.methods.dedup import DedupMethod
from embtab.methods.pep import PEPMethod
from embtab.search import EvolutionConfig, evolve
from embtab.search.dedup import deduplicate, merged_weights
from embtab.search import export as ex
from embtab.search.sparse import csr_bytes, csr_charge, csr_export, csr_parameters, csr_shift, csr_sparsity
from embtab.fused_state import table_parameters
from embtab.shard import embedding_tables_of, physical_weights
from experiments.common import parser, write_json
from experiments.ctr import SECTIONS, load_config, train_config
from experiments.trainer import TrainConfig, Trainer
from models import build_model

METHOD_NAMES = ("full", "optembed", "pep", "mde", "dnis", "deeplight", "dedup", "autosrh", "autodim")


class Run:
    """One seed's data, settings and the model factory shared by every method.

    ``[search.train]`` overrides the [train] settings for the search stages (supernet, PEP's
    thresholded table, DNIS's soft weights): the learnable parts need their own regime (the
    reference codes' initialization scale, learning rates and epochs) to move at all.
    """

    def __init__(self, config: dict[str, Any], seed: int, out: Path) -> None:
        self.config = config
        self.train = replace(train_config(config.get("train", {})), seed=seed, progress=False)
        self.search = dict(config.get("search", {}))
        stage = {"restore_best": False, **self.search.get("train", {})}
        self.stage_train = replace(self.train, **stage)
        data = dict(config["data"])
        self.splits: DatasetSplits = load_dataset(data.pop("name"), **data)
        self.features = self.splits.feature_specs()
        self.dim = int(config["embedding"].get("dim", 16))
        self.optimizer = self.train.sparse()
        self.out = out
        self.full_bytes = full_table_bytes(self.spec(embtab.FullTable()), self.optimizer)
        self.full_parameters = full_table_parameters(self.spec(embtab.FullTable()))

    def spec(self, method: embtab.MethodSpec) -> embtab.EmbeddingSpec:
        return embtab.EmbeddingSpec(features=self.features, dim=self.dim, method=method)

    def solved(self, method: embtab.MethodSpec, budget: Fraction) -> embtab.MethodSpec:
        """`method` with its export target set by `solve_budget` to `budget` of the full bytes."""
        return solve_budget(self.spec(method), int(self.full_bytes * budget), self.optimizer, min_fill=0).method

    def settings(self, method: type[embtab.MethodSpec]) -> dict[str, Any]:
        """The [search] keys that are fields of `method`'s spec."""
        names = {f.name for f in fields(method)}
        return {k: v for k, v in self.search.items() if k in names}

    def model(self, tables: embtab.EmbeddingTables) -> nn.Module:
        settings = dict(self.config["model"])
        return build_model(settings.pop("name"), tables, dense_dim=self.splits.dense_dim, **settings)

    def fit(
        self,
        tables: embtab.EmbeddingTables,
        name: str,
        stage: bool = False,
        model: nn.Module | None = None,
        on_epoch: Callable[[Trainer], None] | None = None,
        config: TrainConfig | None = None,
    ) -> tuple[Trainer, dict[str, Any], float]:
        """Train a model on `tables` (or `model`), with the search-stage settings when `stage`
        (or `config`); `on_epoch` sees the trainer after every epoch. The trainer, its result and
        the seconds."""
        start = time.perf_counter()
        config = config or (self.stage_train if stage else self.train)
        trainer = _Trainer(model or self.model(tables), self.splits, config, self.out / name, on_epoch=on_epoch)
        result = trainer.fit()
        return trainer, result, time.perf_counter() - start


class _Trainer(Trainer):
    """A `Trainer` that calls `on_epoch(trainer)` after every epoch (PEP's snapshots)."""

    def __init__(self, *args: Any, on_epoch: Callable[[Trainer], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_epoch = on_epoch

    def _end_epoch(self) -> None:
        super()._end_epoch()
        if self.on_epoch is not None:
            self.on_epoch(self)


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
    cell = _cell("full", "1", result, run.full_bytes, run.full_bytes, retrain_s=seconds)
    return [{**cell, "parameters": run.full_parameters, "parameter_ratio": 1.0}]


def run_mde(run: Run, budgets: list[Fraction]) -> list[dict[str, Any]]:
    cells = []
    for budget in budgets:
        target = int(run.full_bytes * budget)
        try:
            method = MDE(alpha=float(run.search.get("mde_alpha", 0.3)))
            min_fill = float(run.search.get("mde_min_fill", 0.5))  # widths move in steps of 4
            fit = solve_budget(run.spec(method), target, run.optimizer, min_fill=min_fill)
        except BudgetError as error:
            cells.append({"method": "mde", "budget": str(budget), "unreachable": str(error)})
            continue
        torch.manual_seed(run.train.seed)
        tables = embtab.EmbeddingTables(fit.spec)
        widths = {n: m.width for n, m in tables.methods.items()}
        _, result, seconds = run.fit(tables, f"mde_{_tag(budget)}")
        cell = _cell("mde", str(budget), result, run.full_bytes, fit.bytes, widths=widths, retrain_s=seconds)
        cells.append({**cell, "parameters": fit.cost.parameters, "parameter_ratio": fit.parameter_ratio})
    return cells


def run_optembed(run: Run, budgets: list[Fraction]) -> list[dict[str, Any]]:
    """OptEmbed: the supernet (row thresholds and width sampling), then per result an evolutionary
    width search and a fresh retrain of the found rows and widths. Its own learned result
    ("optembed (learned)") keeps the rows the learned thresholds keep (no budget shift) and the
    widths evolution finds best on validation; the budget-fitted rows ("optembed") raise the
    shift until the export fits each budget."""
    settings = run.settings(OptEmbed)
    torch.manual_seed(run.train.seed)
    supernet = embtab.EmbeddingTables(run.spec(OptEmbed(**settings)))
    trainer, _, super_s = run.fit(supernet, "optembed_supernet", stage=True)
    weights = physical_weights(trainer.model)
    tables = embedding_tables_of(trainer.model)[0]
    choices = [m.width_choices for m in tables.methods.values()]  # type: ignore[union-attr]
    config = EvolutionConfig(**{**run.search.get("evolution", {}), "seed": run.train.seed})
    thresholds = {n: float(m.threshold.detach()) for n, m in tables.methods.items()}  # type: ignore[arg-type]
    ex.set_shift(tables, 0.0)
    learned_plans = ex.plans(tables, weights)
    learned = {
        "thresholds": thresholds,
        "threshold_moved": max(abs(t) for t in thresholds.values()),  # from their initial 0
        "learned_rows_pruned": _rows_pruned(learned_plans),
        "search_epochs": len(trainer.state.history),
        "supernet_s": super_s,
    }
    cells = []
    for budget in [None, *budgets]:
        start = time.perf_counter()
        target = ex.budget_target(run.solved(OptEmbed(**settings), budget)) if budget is not None else None
        fitness = _fitness(trainer, tables, weights, target)
        found = evolve(choices, fitness, config)
        fitness(found.best)  # leave the masks at the best candidate
        evolution_s = time.perf_counter() - start
        label = "optembed" if budget is not None else "optembed (learned)"
        cell = _retrain(run, label, budget, ex.fresh(ex.plans(tables, weights)))
        cell.update(
            learned,
            search_s=super_s + evolution_s,
            evolution_s=evolution_s,
            supernet_valid_auc=found.fitness,
            evaluations=len(found.scores),
        )
        cells.append(cell)
    return cells


def _fitness(
    trainer: Trainer,
    tables: embtab.EmbeddingTables,
    weights: dict[str, torch.Tensor],
    target: tuple[int, embtab.SparseOptimizer | None] | None,
) -> Callable[[tuple[int, ...]], float]:
    """Validation AUC of the supernet with a candidate's widths, pruned to fit the `target`
    (bytes, optimizer) or at the learned thresholds alone (None)."""
    methods = list(tables.methods.values())

    def fitness(candidate: tuple[int, ...]) -> float:
        for method, width in zip(methods, candidate):
            method.eval_width.fill_(width)  # type: ignore[union-attr,operator]
        shift = 0.0 if target is None else ex.fit_shift(ex.table_scores(tables, weights), *target)
        ex.set_shift(tables, shift)
        return trainer.evaluate(trainer.splits.valid).auc

    return fitness


def run_pep(run: Run, budgets: list[Fraction]) -> list[dict[str, Any]]:
    """PEP: train the soft-thresholded table until its learned sparsity reaches every budget (or
    the stage's epochs run out), snapshotting the element mask when it first fits a budget, as the
    reference does ("pep (learned)": no budget shift); the budget-fitted variant ("pep") prunes
    the final table's smallest margins until the CSR export fits. Both rewind the kept elements
    to their initial values and retrain; bytes are the CSR export's (`embtab.search.sparse`)."""
    settings = run.settings(PEP)
    torch.manual_seed(run.train.seed)
    pep = embtab.EmbeddingTables(run.spec(PEP(**settings)))
    initial = physical_weights(pep)
    targets = {budget: int(run.full_bytes * budget) for budget in budgets}
    snapshots: dict[Fraction, tuple[int, dict[str, ex.TablePlan]]] = {}
    trajectory: list[dict[str, float]] = []

    def on_epoch(trainer: Trainer) -> None:
        tables = embedding_tables_of(trainer.model)[0]
        ex.set_shift(tables, 0.0)
        plans = ex.plans(tables, physical_weights(trainer.model))
        charge = _csr_charge(plans)
        epoch = len(trainer.state.history)
        trajectory.append({"epoch": epoch, "csr_bytes": charge, "element_sparsity": _element_sparsity(plans, run)})
        for budget, target in targets.items():
            if budget not in snapshots and charge <= target:
                snapshots[budget] = (epoch, plans)
        if len(snapshots) == len(targets):
            trainer.state.finished = True  # the reference stops once the smallest target is reached

    trainer, _, search_s = run.fit(pep, "pep_search", stage=True, on_epoch=on_epoch)
    weights = physical_weights(trainer.model)
    tables = embedding_tables_of(trainer.model)[0]
    s_moved = {n: float((m.s.detach() - run.search.get("init_threshold", PEP.init_threshold)).abs().max())
               for n, m in tables.methods.items() if isinstance(m, PEPMethod) and m.s is not None}
    common = {
        "search_s": search_s,
        "search_epochs": len(trainer.state.history),
        "learned_element_sparsity": trajectory[-1]["element_sparsity"] if trajectory else 0.0,
        "threshold_moved": max(s_moved.values(), default=0.0),
        "sparsity_trajectory": trajectory,
    }
    cells = []
    for budget, target in targets.items():
        if budget in snapshots:
            epoch, plans = snapshots[budget]
            cell = _retrain_sparse(run, "pep (learned)", budget, ex.rewind(plans, initial))
            cells.append({**cell, **common, "reached_at_epoch": epoch})
        else:
            cells.append({"method": "pep (learned)", "budget": str(budget), **common,
                          "unreachable": f"learned sparsity did not reach {target} CSR bytes in "
                                         f"{common['search_epochs']} epochs (reached {trajectory[-1]['csr_bytes']})"})
        with torch.no_grad():
            margins = {n: m.margins(*_physical_args(m, weights)) for n, m in tables.methods.items()}
        try:
            ex.set_shift(tables, csr_shift(margins, target))
        except BudgetError as error:
            cells.append({"method": "pep", "budget": str(budget), "unreachable": str(error)})
            continue
        plans = ex.plans(tables, weights)
        cell = _retrain_sparse(run, "pep", budget, ex.rewind(plans, initial))
        cells.append({**cell, **common})
    return cells


def _physical_args(method: Any, weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    tensors = [weights[p.name] for p in method.physical_tables]
    return (tensors[0], tensors[1]) if method.per_id else (tensors[0],)


def _csr_charge(plans: dict[str, ex.TablePlan]) -> int:
    """Bytes of the plans' CSR exports (every table's rows, its non-zero elements)."""
    return sum(csr_charge(p.keep.numel(), _nonzeros(p)) for p in plans.values())


def _nonzeros(plan: ex.TablePlan) -> int:
    return int((plan.values != 0).sum())  # type: ignore[union-attr]


def _retrain_sparse(
    run: Run, label: str, budget: Fraction, plans: dict[str, ex.TablePlan], dense_from: Trainer | None = None
) -> dict[str, Any]:
    """Retrain an element-sparse plan (zeros frozen), then charge it its real CSR export."""
    cell = _retrain(run, label, budget, plans, dense_from=dense_from)
    parameters = sum(csr_parameters(p.keep.numel(), _nonzeros(p)) for p in plans.values())
    cell.update(
        train_bytes=cell["bytes"],
        bytes=_csr_charge(plans),
        export_csr_bytes=cell.pop("csr_bytes"),
        parameters=parameters,
        element_sparsity=_element_sparsity(plans, run),
    )
    cell["parameter_ratio"] = cell["parameters"] / run.full_parameters
    return cell


def _alpha_search(
    trainer: Trainer, search_s: float
) -> tuple[dict[str, torch.Tensor], embtab.EmbeddingTables, dict[str, torch.Tensor], dict[str, Any]]:
    """After a search stage whose methods learn weights `alpha` from an initial 1 (DNIS, AutoSrh):
    the trained tables' weights, the tables, their alphas and the stage's figures."""
    weights = physical_weights(trainer.model)
    tables = embedding_tables_of(trainer.model)[0]
    alphas = {n: m.alpha.detach() for n, m in tables.methods.items()}  # type: ignore[union-attr]
    figures = {
        "search_s": search_s,
        "search_epochs": len(trainer.state.history),
        "threshold_moved": max(float((a - 1).abs().max()) for a in alphas.values()),
    }
    return weights, tables, alphas, figures


def run_dnis(run: Run, budgets: list[Fraction]) -> list[dict[str, Any]]:
    """DNIS: train the soft dimension weights with the model, prune columns (none for its own
    result "dnis (learned)"; to each budget for "dnis"), then fine-tune with the trained dense
    network kept."""
    torch.manual_seed(run.train.seed)
    dnis = embtab.EmbeddingTables(run.spec(DNIS()))
    trainer, _, search_s = run.fit(dnis, "dnis_search", stage=True)
    weights, tables, alphas, common = _alpha_search(trainer, search_s)
    common["alpha_spread"] = {n: [float(a.abs().min()), float(a.abs().max())] for n, a in alphas.items()}
    cells = []
    for budget in [None, *budgets]:
        shift = 0.0
        if budget is not None:
            try:
                shift = ex.fit_shift(ex.table_scores(tables, weights), *ex.budget_target(run.solved(DNIS(), budget)))
            except BudgetError as error:
                cells.append({"method": "dnis", "budget": str(budget), "unreachable": str(error)})
                continue
        ex.set_shift(tables, shift)
        label = "dnis" if budget is not None else "dnis (learned)"
        cell = _retrain(run, label, budget, ex.plans(tables, weights), dense_from=trainer)
        cells.append({**cell, **common})
    return cells


def run_deeplight(run: Run, budgets: list[Fraction]) -> list[dict[str, Any]]:
    """DeepLight, per budget: train with the table pruned gradually towards the share of zeros
    whose CSR export fits the budget (the main [train] settings, the last state kept: the mask
    moves while it trains; the schedule's keys from [search]), prune the smallest magnitudes left
    until the export fits exactly, then fine-tune with the mask fixed and the dense network kept.
    Bytes are the CSR export's."""
    settings = run.settings(DeepLight)
    shapes = [(t.cardinality, t.dim) for t in run.spec(embtab.FullTable()).tables()]
    cells = []
    for budget in budgets:
        target = int(run.full_bytes * budget)
        try:
            sparsity = csr_sparsity(shapes, target)
        except ValueError as error:
            cells.append({"method": "deeplight", "budget": str(budget), "unreachable": str(error)})
            continue
        torch.manual_seed(run.train.seed)
        tables = embtab.EmbeddingTables(run.spec(DeepLight(**{**settings, "sparsity": sparsity})))
        config = replace(run.train, restore_best=False)
        trainer, _, train_s = run.fit(tables, f"deeplight_train_{_tag(budget)}", config=config)
        weights = physical_weights(trainer.model)
        tables = embedding_tables_of(trainer.model)[0]
        reached = sum(int((w == 0).sum()) for w in weights.values()) / run.full_parameters
        with torch.no_grad():
            margins = {n: m.margins(weights[n]) for n, m in tables.methods.items()}  # type: ignore[operator]
        ex.set_shift(tables, csr_shift(margins, target))
        cell = _retrain_sparse(run, "deeplight", budget, ex.plans(tables, weights), dense_from=trainer)
        cells.append({**cell, "search_s": train_s, "search_epochs": len(trainer.state.history),
                      "target_sparsity": sparsity, "learned_element_sparsity": reached})
    return cells


# A Dedup cell in which no pair of blocks passed the closeness test: every merge was a relaxed one
# (into the nearest block), so the row is nearest-block merging, not deduplication.
RELAXED_DEDUP = "dedup (nearest-block merges)"


def run_dedup(run: Run, budgets: list[Fraction]) -> list[dict[str, Any]]:
    """Dedup: train the full table once; per budget, size the stored blocks of each table
    (`solve_budget`), merge its near-duplicate blocks down to them (`embtab.search.dedup`), and
    fine-tune the merged tables with the trained dense network kept (tables left full keep their
    trained rows)."""
    settings = run.settings(Dedup)
    torch.manual_seed(run.train.seed)
    trainer, _, full_s = run.fit(embtab.EmbeddingTables(run.spec(embtab.FullTable())), "dedup_full")
    weights = physical_weights(trainer.model)
    cells = []
    for budget in budgets:
        start = time.perf_counter()
        try:
            min_fill = float(run.search.get("dedup_min_fill", 0.5))  # blocks move in steps of block_rows
            fit = solve_budget(run.spec(Dedup(**settings)), int(run.full_bytes * budget), run.optimizer, min_fill=min_fill)
            tables, merges = _deduplicated(fit.spec, weights)
        except ValueError as error:  # a BudgetError, or too few duplicates without `relax`
            cells.append({"method": "dedup", "budget": str(budget), "unreachable": str(error)})
            continue
        dedup_s = time.perf_counter() - start
        model = run.model(tables)
        _load_dense(model, trainer.model.module)
        _, result, seconds = run.fit(tables, f"dedup_{_tag(budget)}", model=model)
        duplicates = sum(m["duplicates"] for m in merges.values())
        relaxed = sum(m["relaxed"] for m in merges.values())
        label = RELAXED_DEDUP if relaxed and not duplicates else "dedup"
        cell = _cell(label, str(budget), result, run.full_bytes, fit.bytes, retrain_s=seconds)
        cells.append({**cell, "parameters": fit.cost.parameters, "parameter_ratio": fit.parameter_ratio,
                      "search_s": full_s + dedup_s, "dedup_s": dedup_s, "merges": merges,
                      "duplicates": duplicates, "relaxed_merges": relaxed})
    return cells


def run_autosrh(run: Run, budgets: list[Fraction]) -> list[dict[str, Any]]:
    """AutoSrh: train the table with its frequency-group x dimension weights (groups from the
    training counts; the main [train] settings, the last state kept), then prune the smallest
    ``|e * alpha|`` (none beyond the weights clipped to 0 for "autosrh (learned)"; until the CSR
    export fits each budget for "autosrh"), fold the weights into the kept values and retrain them
    with the mask fixed and the dense network kept. Bytes are the CSR export's."""
    torch.manual_seed(run.train.seed)
    tables = embtab.EmbeddingTables(run.spec(AutoSrh(**run.settings(AutoSrh))))
    counts = run.splits.id_counts()
    for name, method in tables.methods.items():
        method.set_groups(counts[name])  # type: ignore[operator]
    config = replace(run.train, restore_best=False)
    trainer, _, search_s = run.fit(tables, "autosrh_search", config=config)
    weights, tables, alphas, common = _alpha_search(trainer, search_s)
    common["alpha_zero_share"] = sum(int((a == 0).sum()) for a in alphas.values()) / sum(a.numel() for a in alphas.values())
    cells = []
    for budget in [None, *budgets]:
        shift = 0.0
        if budget is not None:
            with torch.no_grad():
                margins = {n: m.margins(weights[n]) for n, m in tables.methods.items()}  # type: ignore[operator]
            try:
                shift = csr_shift(margins, int(run.full_bytes * budget))
            except ValueError as error:
                cells.append({"method": "autosrh", "budget": str(budget), "unreachable": str(error)})
                continue
        ex.set_shift(tables, shift)
        label = "autosrh" if budget is not None else "autosrh (learned)"
        cell = _retrain_sparse(run, label, budget, ex.plans(tables, weights), dense_from=trainer)  # type: ignore[arg-type]
        cells.append({**cell, **common})
    return cells


def run_autodim(run: Run, budgets: list[Fraction]) -> list[dict[str, Any]]:
    """AutoDim: train the candidate tables and their Gumbel-softmax mixture, then retrain from
    scratch each table at its chosen width ("autodim (learned)": the largest weight; "autodim":
    the most likely widths that fit each budget, refused below every table at its narrowest)."""
    settings = run.settings(AutoDim)
    torch.manual_seed(run.train.seed)
    trainer, _, search_s = run.fit(embtab.EmbeddingTables(run.spec(AutoDim(**settings))), "autodim_search")
    tables = embedding_tables_of(trainer.model)[0]
    preferences = {n: (m.widths, m.alpha.detach().clone()) for n, m in tables.methods.items()}  # type: ignore[union-attr]
    logical = {t.name: t for t in run.spec(embtab.FullTable()).tables()}

    @functools.cache
    def cost(name: str, width: int) -> int:
        alone = embtab.EmbeddingSpec(features=logical[name].features, dim=run.dim, method=retrain_method(width))
        return spec_cost(alone, run.optimizer).bytes

    common = {"search_s": search_s, "search_epochs": len(trainer.state.history),
              "alphas": {n: a.tolist() for n, (_, a) in preferences.items()}}
    cells = []
    for budget in [None, *budgets]:
        label = "autodim" if budget is not None else "autodim (learned)"
        if budget is None:
            widths = {n: m.chosen_width() for n, m in tables.methods.items()}  # type: ignore[union-attr,operator]
        else:
            try:
                run.solved(AutoDim(**settings), budget)
                widths = fit_widths(preferences, cost, int(run.full_bytes * budget))
            except BudgetError as error:
                reason = (f"budget {error.budget} bytes is below AutoDim's smallest result, every table at its "
                          f"narrowest candidate width with its projection: {error.nearest} bytes")
                cells.append({"method": label, "budget": str(budget), "unreachable": reason})
                continue
        spec = embtab.EmbeddingSpec(features=run.features, dim=run.dim, method=embtab.FullTable(),
                                    table_methods=tuple((n, retrain_method(w)) for n, w in widths.items()))
        torch.manual_seed(run.train.seed)
        _, result, seconds = run.fit(embtab.EmbeddingTables(spec), f"{label.replace(' ', '_')}_{_tag(budget)}")
        spent = spec_cost(spec, run.optimizer)
        cell = _cell(label, _budget_text(budget), result, run.full_bytes, spent.bytes, widths=widths, retrain_s=seconds)
        cells.append({**cell, **common, "parameters": spent.parameters,
                      "parameter_ratio": spent.parameters / run.full_parameters})
    return cells


def _deduplicated(
    spec: embtab.EmbeddingSpec, weights: dict[str, torch.Tensor]
) -> tuple[embtab.EmbeddingTables, dict[str, dict[str, int]]]:
    """Tables of `spec` holding the trained `weights` (by table name): each Dedup table its
    merged blocks and block map, each other table its trained rows; and the merges per table."""
    tables = embtab.EmbeddingTables(spec)
    parameters = table_parameters(tables)
    merges = {}
    with torch.no_grad():
        for name, method in tables.methods.items():
            physical = method.physical_tables[0].name
            if not isinstance(method, DedupMethod):
                parameters[physical].copy_(weights[name])
                continue
            table_spec = spec.method_of(name)
            plan = deduplicate(weights[name], table_spec)  # type: ignore[arg-type]
            method.set_block_map(plan.block_map)
            parameters[physical].copy_(merged_weights(weights[name], plan, method.block_rows))
            merges[name] = {"blocks": int(plan.kept.numel()), "duplicates": plan.duplicates, "relaxed": plan.relaxed}
    return tables, merges


def _element_sparsity(table_plans: dict[str, ex.TablePlan], run: Run) -> float:
    """Share of the full table's elements that are zero (PEP's own measure)."""
    nonzero = sum(int((p.values != 0).sum()) for p in table_plans.values() if p.values is not None)
    return 1 - nonzero / run.full_parameters


def _rows_pruned(table_plans: dict[str, ex.TablePlan]) -> float:
    cardinality = sum(p.keep.numel() for p in table_plans.values())
    return 1 - sum(p.kept for p in table_plans.values()) / cardinality


def _retrain(
    run: Run,
    method: str,
    budget: Fraction | None,
    table_plans: dict[str, ex.TablePlan],
    dense_from: Trainer | None = None,
) -> dict[str, Any]:
    """Retrain the compact architecture (the dense network afresh, or kept from `dense_from`),
    then export it (fp32, int8 and CSR) and test the exports."""
    torch.manual_seed(run.train.seed)
    spec = run.spec(embtab.FullTable())
    compact = ex.build_compact(spec, table_plans, freeze_zeros=True)
    trained_bytes = compact.memory_bytes(run.optimizer).total
    model = None
    if dense_from is not None:
        model = run.model(compact)
        _load_dense(model, dense_from.model.module)
    trainer, result, retrain_s = run.fit(compact, f"{method.replace(' ', '_')}_{_tag(budget)}", model=model)
    exported = _export(run, trainer, table_plans)
    fp32_auc = evaluate(exported, run.splits.test, run.train.eval_batch_size)
    fp32_bytes = ex.allocated_bytes(exported.embeddings)
    final = ex.trained(table_plans, physical_weights(trainer.model))
    csr = sum(csr_bytes(csr_export(_dense_rows(p, run.dim))) for p in final.values())
    ex.quantize(exported.embeddings)
    int8_auc = evaluate(exported, run.splits.test, run.train.eval_batch_size)
    parameters = spec_cost(ex.compact_spec(spec, table_plans, True), run.optimizer).parameters
    cell = _cell(method, _budget_text(budget), result, run.full_bytes, trained_bytes,
                 widths={n: p.width for n, p in table_plans.items()}, retrain_s=retrain_s)
    cell.update(
        parameters=parameters,
        parameter_ratio=parameters / run.full_parameters,
        rows_pruned=_rows_pruned(table_plans),
        rows_pruned_per_table={n: 1 - p.kept / p.keep.numel() for n, p in table_plans.items()},
        export_fp32_test_auc=fp32_auc,
        export_fp32_bytes=fp32_bytes,
        int8_test_auc=int8_auc,
        int8_bytes=ex.allocated_bytes(exported.embeddings),
        csr_bytes=csr,
    )
    return cell


def _dense_rows(plan: ex.TablePlan, dim: int) -> torch.Tensor:
    """A plan's values back at their rows and columns of the full ``[n, dim]`` table."""
    rows = torch.zeros(plan.keep.numel(), dim)
    rows[plan.keep.nonzero().squeeze(1).unsqueeze(1), plan.columns.unsqueeze(0)] = plan.values  # type: ignore[index]
    return rows


def _load_dense(model: nn.Module, source: nn.Module) -> None:
    """Copy the dense (non-embedding) parameters and buffers of `source` into `model`."""
    dense = {k: v for k, v in source.state_dict().items() if not isinstance(v, ShardedTensor)}
    mine = model.state_dict()
    shared = {k: v for k, v in dense.items() if k in mine and mine[k].shape == v.shape and ".embeddings." not in k}
    model.load_state_dict(shared, strict=False)


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
    budget: str,
    result: dict[str, Any],
    full_bytes: int,
    bytes_: int,
    widths: dict[str, int] | None = None,
    retrain_s: float = 0.0,
) -> dict[str, Any]:
    fraction = Fraction(budget) if budget != "learned" else None
    return {
        "method": method,
        "budget": budget,
        "test_auc": result["test_auc"],
        "test_logloss": result["test_logloss"],
        "valid_auc": result["valid_auc"],
        "best_epoch": result["best_epoch"],
        "epochs_run": result["epochs_run"],
        "bytes": bytes_,
        "budget_bytes": int(full_bytes * fraction) if fraction is not None else None,
        "widths": widths,
        "retrain_s": retrain_s,
    }


def _budget_text(budget: Fraction | None) -> str:
    return "learned" if budget is None else str(budget)


def _tag(budget: Fraction | None) -> str:
    return _budget_text(budget).replace("/", "_")


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
    runners = {"full": run_full, "optembed": run_optembed, "pep": run_pep, "mde": run_mde, "dnis": run_dnis,
               "deeplight": run_deeplight, "dedup": run_dedup, "autosrh": run_autosrh, "autodim": run_autodim}
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
