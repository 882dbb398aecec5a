"""Train and evaluate one CTR model with one embedding method on one dataset.

    python -m experiments.ctr --config experiments/configs/din_movielens.toml --out results/ctr/din
    python -m experiments.ctr --dataset movielens --model embedding_mlp --epochs 2 --out results/ctr/emb
    python -m experiments.ctr --config ... --set train.sparse_lr=0.1 --set model.dropout=0.1
    torchrun --nproc_per_node 2 -m experiments.ctr --distributed --config ... --out results/ctr/din2

The configuration is a TOML file with the tables [data], [model], [embedding] and [train];
command-line flags and `--set section.key=value` override it. The run prints and saves (to
`<out>/result.json`) test AUC and logloss, embedding bytes, total parameters, and train and
inference samples/s; per-epoch metrics go to `<out>/metrics.csv`. With `export_precision` in
[embedding] (fp32, fp16, int8, int4, int2) a budget counts the tables' served bytes at that
precision, and the trained model is also exported (`embtab.quant.export`) and tested through
fbgemm's inference kernels (`served_bytes`, `served_test_auc`).

With `--distributed` (under torchrun) the tables are sharded over the ranks as the optional
[sharding] table says (`default_types`, `types = {table = [...]}`, `rank_memory_bytes`,
`column_shard_width`: the fields of `embtab.ShardingConstraints`), each rank trains on its share of
every global batch, metrics are computed over all ranks and only rank 0 prints and writes.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import tomllib
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

import embtab
from embtab.budget import full_table_parameters, solve_budget, solve_parameter_ratio, spec_cost
from embtab.methods import METHODS
from embtab.methods.base import SizedSpec
from data import DatasetSplits, load_dataset
from data.registry import loader_of
from embtab.checks import check_call, check_field_types, check_keys
from embtab.quant.precision import check_served_precision
from embtab.files import FolderBusyError
from embtab.shard import ShardingConstraints
from experiments.common import is_writer, join_torchrun, parser, write_json
from experiments.trainer import TrainConfig, Trainer
from models import MODELS, build_model

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"name": "movielens"},
    "model": {"name": "din"},
    "embedding": {"dim": 16, "method": {"name": "full"}},
    "train": {},
}

PLACEHOLDER_SIZE = 64
SECTIONS = ("data", "model", "embedding", "train", "sharding")
BUDGET_KEYS = ("budget_bytes", "budget_parameter_ratio", "budget_min_fill")
EXPORT_KEY = "export_precision"  # served at this precision: budget in served bytes, test through the export
EMBEDDING_KEYS = (
    "dim", "method", "table_methods", "precision", "table_precisions", "low_precision", EXPORT_KEY, *BUDGET_KEYS
)

FLAGS = {
    "dataset": ("data", "name", str),
    "model": ("model", "name", str),
    "method": ("embedding", "method.name", str),
    "dim": ("embedding", "dim", int),
    "budget": ("embedding", "budget_bytes", int),
    "epochs": ("train", "epochs", int),
    "batch_size": ("train", "batch_size", int),
    "dense_lr": ("train", "dense_lr", float),
    "sparse_lr": ("train", "sparse_lr", float),
    "sparse_optimizer": ("train", "sparse_optimizer", str),
    "seed": ("train", "seed", int),
    "threads": ("train", "threads", int),
    "device": ("train", "device", str),
}


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `config["a"]["b"]["c"] = value` for ``dotted = "a.b.c"``, creating tables as needed."""
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {key!r} is a value, not a table")
    node[leaf] = value


def parse_value(text: str) -> Any:
    """A Python/TOML literal (number, list, bool) where it parses as one, else the string itself."""
    lowered = {"true": True, "false": False}.get(text.lower())
    if lowered is not None:
        return lowered
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(
    path: str | None, overrides: list[str], flags: dict[str, Any], sections: Sequence[str] = SECTIONS
) -> dict[str, Any]:
    """The defaults, updated by the TOML file at `path`, the command-line `flags` and the
    ``--set`` `overrides` (in that order), then checked (`check_config`); `sections` are the
    tables the file may hold (a command with a table of its own adds it)."""
    config = copy.deepcopy(DEFAULTS)
    if path:
        with open(path, "rb") as f:
            loaded = tomllib.load(f)
        check_keys(loaded, sections, f"{path}: sections")
        for section, table in loaded.items():
            if not isinstance(table, dict):
                raise ValueError(f"{path}: {section} = {table!r}, expected a [{section}] table")
            config.setdefault(section, {}).update(table)
    for name, (section, key, _) in FLAGS.items():
        if flags.get(name) is not None:
            set_dotted(config[section], key, flags[name])
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        set_dotted(config, key.strip(), parse_value(value.strip()))
    check_config(config, sections)
    return config


def check_config(config: dict[str, Any], sections: Sequence[str] = SECTIONS) -> None:
    """Reject, before any work, unknown sections and keys and ill-typed or out-of-range values
    of every layer, naming the key: [train] (`TrainConfig`), [embedding] (its keys, the budget,
    the method's fields), [model] (the model's constructor) and [data] (the dataset's loader)."""
    check_keys(config, sections, "configuration sections")
    for section in ("data", "model"):
        if not isinstance(config.get(section), dict) or not isinstance(config[section].get("name"), str):
            raise ValueError(f"[{section}]: expected a table with a name, got {config.get(section)!r}")
    train_config(config.get("train", {}))
    embedding = config.get("embedding", {})
    check_keys(embedding, EMBEDDING_KEYS, "[embedding]")
    _budget(embedding)
    if EXPORT_KEY in embedding:
        check_served_precision(embedding[EXPORT_KEY], f"[embedding]: {EXPORT_KEY}")
    settings = dict(config["model"])
    name = settings.pop("name")
    if name not in MODELS:
        raise ValueError(f"[model]: unknown model {name!r}; expected one of {sorted(MODELS)}")
    check_call(MODELS[name], {"embeddings": None, **settings}, f"[model] {name}")
    data = {k: v for k, v in config["data"].items() if k not in ("name", "validation_in_train")}
    if not isinstance(config["data"].get("validation_in_train", False), bool):
        raise ValueError(f"[data]: validation_in_train = {config['data']['validation_in_train']!r}, expected true or false")
    check_call(loader_of(config["data"]["name"])[0], data, f"[data] {config['data']['name']}")


def _budget(embedding: dict[str, Any]) -> tuple[int | None, float | None, float]:
    """The [embedding] budget in bytes or as a parameter ratio (None: none given) and its minimum
    fill, checked."""
    budget, ratio = embedding.get("budget_bytes"), embedding.get("budget_parameter_ratio")
    if budget is not None and ratio is not None:
        raise ValueError("[embedding]: budget_bytes and budget_parameter_ratio are both set; expected one of them")
    if budget is not None:
        integral = isinstance(budget, (int, float)) and not isinstance(budget, bool) and math.isfinite(budget)
        if not integral or budget != int(budget) or budget < 1:
            raise ValueError(
                f"[embedding]: budget_bytes = {budget!r}, expected a whole number of bytes >= 1 "
                "(leave it out for no budget)"
            )
        budget = int(budget)
    if ratio is not None:
        numeric = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio)
        if not numeric or not 0 < ratio <= 1:
            raise ValueError(
                f"[embedding]: budget_parameter_ratio = {ratio!r}, expected a fraction in (0, 1] of the "
                "full tables' parameters (leave it out for no budget)"
            )
        ratio = float(ratio)
    min_fill = embedding.get("budget_min_fill", 0.9)
    if not isinstance(min_fill, (int, float)) or isinstance(min_fill, bool) or not 0 < min_fill <= 1:
        raise ValueError(f"[embedding]: budget_min_fill = {min_fill!r}, expected a fraction in (0, 1]")
    return budget, ratio, float(min_fill)


def train_config(table: dict[str, Any]) -> TrainConfig:
    check_keys(table, [f.name for f in fields(TrainConfig)], "[train]")
    return TrainConfig(**table)


def embedding_spec(
    table: dict[str, Any], splits: DatasetSplits, optimizer: embtab.SparseOptimizer
) -> embtab.EmbeddingSpec:
    """The dataset's features with the configured width and method (sized to a budget if one is set)."""
    check_keys(table, EMBEDDING_KEYS, "[embedding]")
    budget, ratio, min_fill = _budget(table)
    settings = {k: v for k, v in table.items() if k not in (*BUDGET_KEYS, EXPORT_KEY)}
    if budget is not None or ratio is not None:
        settings["method"] = _with_placeholder_size(settings.get("method", {"name": "full"}))
    try:
        spec = embtab.EmbeddingSpec.from_dict(
            {**settings, "features": [asdict(f) for f in splits.feature_specs()]}
        )
    except TypeError as err:  # a method table with a key its spec lacks
        raise ValueError(f"[embedding]: {err}") from err
    for where, method in (("method", spec.method), *((f"table_methods.{n}", m) for n, m in spec.table_methods)):
        check_field_types(method, f"[embedding.{where}] {method.name}")
    if budget is not None:
        spec = solve_budget(spec, budget, optimizer, min_fill=min_fill, served_precision=table.get(EXPORT_KEY)).spec
    elif ratio is not None:
        spec = solve_parameter_ratio(spec, ratio, optimizer, min_fill=min_fill).spec
    return spec


def _with_placeholder_size(method: dict[str, Any]) -> dict[str, Any]:
    """A method table whose size knob may be left out: the budget solver sets it."""
    spec = METHODS.get(method.get("name", ""))
    if spec is None or not issubclass(spec, SizedSpec):
        return dict(method)
    return {spec.size_field: PLACEHOLDER_SIZE, **method}


def sharding_constraints(table: dict[str, Any]) -> ShardingConstraints:
    """The [sharding] table as `ShardingConstraints` (lists become tuples)."""
    known = {f.name for f in fields(ShardingConstraints)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"unknown [sharding] keys {unknown}; expected some of {sorted(known)}")
    settings = dict(table)
    if "default_types" in settings:
        settings["default_types"] = tuple(settings["default_types"])
    if "sharding_types" in settings:
        settings["sharding_types"] = {k: tuple(v) for k, v in settings["sharding_types"].items()}
    return ShardingConstraints(**settings)


def model_from_config(
    config: dict[str, Any], splits: DatasetSplits, train: TrainConfig
) -> tuple[torch.nn.Module, embtab.EmbeddingTables]:
    """The [model] of `config` over the tables of its [embedding] (sized to a budget if one is set)."""
    tables = embtab.EmbeddingTables(embedding_spec(config["embedding"], splits, train.sparse()))
    settings = dict(config["model"])
    if settings.get("mba_lambda", 0) > 0 and "id_counts" not in settings:
        settings["id_counts"] = splits.id_counts()
    return build_model(settings.pop("name"), tables, dense_dim=splits.dense_dim, **settings), tables


def run(
    config: dict[str, Any],
    out_dir: str | Path,
    stop_after_steps: int | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Build data, tables and model from `config`, train, test; returns (and saves) the figures.

    With a `process_group` of several ranks, every rank calls this; rank 0 writes the files."""
    out_dir = Path(out_dir)
    check_config(config)
    train = train_config(config.get("train", {}))
    torch.manual_seed(train.seed)
    data_settings = dict(config["data"])
    validation_in_train = bool(data_settings.pop("validation_in_train", False))
    splits = load_dataset(data_settings.pop("name"), **data_settings)
    if validation_in_train:
        splits = splits.with_validation_in_train()
    model, tables = model_from_config(config, splits, train)
    spec = tables.spec
    memory = tables.memory_bytes(train.sparse())
    dense_parameters = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in tables.parameters()
    )
    embedding_parameters = spec_cost(spec, train.sparse()).parameters  # elements, whatever their precision
    trainer = Trainer(
        model,
        splits,
        train,
        out_dir,
        stop_after_steps=stop_after_steps,
        process_group=process_group,
        constraints=sharding_constraints(config.get("sharding", {})),
        described={section: config[section] for section in ("data", "model", "embedding")},
    )
    if trainer.world > 1 and is_writer():
        print(f"sharding plan over {trainer.world} ranks:\n{trainer.plan}")
    result = trainer.fit()
    if "stopped_at_step" in result:
        return result
    summary = {
        "dataset": config["data"]["name"],
        "model": config["model"]["name"],
        "method": spec.method.to_dict(),
        "table_methods": {name: m.to_dict() for name, m in spec.table_methods},
        "embedding_bytes": memory.total,
        "embedding_parameters": embedding_parameters,
        "embedding_parameter_ratio": embedding_parameters / full_table_parameters(spec),
        "embedding_parameter_bytes": memory.parameter_bytes,
        "total_parameters": embedding_parameters + dense_parameters,
        "world_size": trainer.world,
        "plan": trainer.plan,
        **{k: v for k, v in result.items() if k != "history"},
        **_served(trainer, config["embedding"].get(EXPORT_KEY), splits),
        "history": result["history"],
        "config": config,
    }
    if is_writer():
        write_json(out_dir / "result.json", summary)
    return summary


def _served(trainer: Trainer, precision: str | None, splits: DatasetSplits) -> dict[str, Any]:
    """The trained model exported at `precision` (`embtab.quant.export`): its served bytes and its
    test metrics through fbgemm's inference kernels (nothing without an export precision)."""
    if precision is None:
        return {}
    from experiments.precision import served_metrics

    auc, logloss, size = served_metrics(trainer, precision, splits)
    return {"served_precision": precision, "served_bytes": size, "served_test_auc": auc, "served_test_logloss": logloss}


def print_summary(summary: dict[str, Any]) -> None:
    print(
        f"test AUC {summary['test_auc']:.4f} | logloss {summary['test_logloss']:.4f} | "
        f"best epoch {summary['best_epoch']} | embedding {summary['embedding_bytes'] / 2**20:.2f} MiB | "
        f"parameters {summary['total_parameters']:,} | train {summary['train_samples_per_s']:,.0f} samples/s | "
        f"inference {summary['inference_samples_per_s']:,.0f} samples/s"
    )
    if "served_precision" in summary:
        print(
            f"served at {summary['served_precision']}: test AUC {summary['served_test_auc']:.4f} | "
            f"logloss {summary['served_test_logloss']:.4f} | {summary['served_bytes']:,} bytes"
        )


def main() -> None:
    p = parser(__doc__.splitlines()[0], "results/ctr")
    p.add_argument("--config", help="TOML file with [data], [model], [embedding], [train]")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value"
    )
    for name, (_, _, kind) in FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind)
    p.add_argument("--distributed", action="store_true", help="shard over the ranks torchrun starts")
    args = p.parse_args()
    try:
        config = load_config(args.config, args.set, vars(args))
        group = join_torchrun(config["train"].get("device", "cpu")) if args.distributed else None
        summary = run(config, args.out, process_group=group)
    except (ValueError, FolderBusyError) as error:  # bad input or a busy folder: the message says it all
        raise SystemExit(f"experiments.ctr: {error}") from None
    if is_writer():
        print_summary(summary)
        print(json.dumps({k: summary[k] for k in ("test_auc", "test_logloss", "embedding_bytes")}))
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
