"""Low-precision training against post-training quantization, on one CTR configuration.

For each seed, the same data, model and training protocol (early stopping on validation) run as:

- ``fp32``: the reference; its best model is then exported (`embtab.quant.export`) at fp16 / int8 /
  int4 / int2 and evaluated on the test set through fbgemm's inference kernels (post-training
  quantization, ``ptq@<precision>``: per-row scale and bias from the row's min and max).
- ``fp16-nearest`` / ``fp16-stochastic``: fp16 tables, rounded by the fused CPU kernel to nearest,
  or stochastically by embtab after each fused update.
- ``lpt@<b>`` / ``alpt@<b>``: quantization-aware training at b bits (fixed step per table; a
  learnable step per row), evaluated as trained and as exported to fbgemm's INT<b> kernels
  (``exported_auc``).

The QAT grid's step of each table is set from the fp32 run of the same seed: the 99.9th percentile
of the table's |w| divided by 2^(b-1) (LPT's fixed step, ALPT's initial step); ALPT's step
learning rate is ``--alpt-lr-scale`` times the median of those steps. Each row of the output is one (variant, seed) with its
test AUC and logloss and its served bytes; a summary gives mean and std over the seeds.

    python -m experiments.precision --config experiments/configs/din_movielens.toml --seeds 0 1 2 \
        --out results/precision_movielens
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from data import load_dataset, make_dataloader
from embtab.quant.export import export, served_bytes, trained_weights
from experiments.common import parser, write_json
from experiments.ctr import load_config, model_from_config, set_dotted, train_config
from experiments.trainer import Trainer

PTQ_PRECISIONS = ("fp16", "int8", "int4", "int2")


@torch.no_grad()
def test_metrics(model: nn.Module, splits, batch_size: int = 8192) -> tuple[float, float]:
    """Test AUC and logloss of a plain (unfused) model."""
    model.eval()
    logits, labels = [], []
    for batch in make_dataloader(splits.test, batch_size, shuffle=False):
        logits.append(model(batch.sparse, batch.dense))
        labels.append(batch.labels)
    logit, label = torch.cat(logits), torch.cat(labels)
    auc = float(binary_auroc(torch.sigmoid(logit), label.long()))
    return auc, float(nn.functional.binary_cross_entropy_with_logits(logit, label))


def served_metrics(trainer: Trainer, precision: str, splits) -> tuple[float, float, int]:
    """Test metrics and bytes of the trained model with its tables exported at `precision`."""
    model = trainer._user_model()
    original = model.embeddings
    served = export(trainer.model, precision)
    model.embeddings = served
    try:
        auc, logloss = test_metrics(model, splits)
    finally:
        model.embeddings = original
    return auc, logloss, served_bytes(served)


def train(config: dict[str, Any], splits, out_dir: Path) -> tuple[Trainer, dict[str, Any]]:
    settings = train_config(config.get("train", {}))
    torch.manual_seed(settings.seed)
    model, _ = model_from_config(config, splits, settings)
    trainer = Trainer(model, splits, settings, out_dir)
    return trainer, trainer.fit()


def grid_steps(trainer: Trainer, bits: int) -> dict[str, float]:
    """Per logical table: the 99.9th percentile of |w| of its physical tables in a trained model,
    over 2^(bits-1)."""
    weights = trained_weights(trainer.model)
    tables = trainer._user_model().embeddings
    steps = {}
    for name, method in tables.methods.items():
        values = torch.cat([weights[p.name].abs().flatten() for p in method.physical_tables])
        sample = values[:: max(1, values.numel() // 1_000_000)]
        steps[name] = float(torch.quantile(sample, 0.999).clamp(min=1e-6)) / 2 ** (bits - 1)
    return steps


def variant_config(base: dict[str, Any], seed: int, embedding: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(base)
    set_dotted(config, "train.seed", seed)
    set_dotted(config, "train.progress", False)
    config["embedding"].update(embedding)
    return config


def run_seed(base: dict[str, Any], seed: int, bits: Sequence[int], splits, out: Path, lr_scale: float) -> list[dict]:
    rows: list[dict[str, Any]] = []

    def record(variant: str, trainer: Trainer, result: dict[str, Any], exported: str | None) -> None:
        row = {
            "variant": variant,
            "seed": seed,
            "test_auc": result["test_auc"],
            "test_logloss": result["test_logloss"],
            "train_samples_per_s": result["train_samples_per_s"],
        }
        if exported:
            row["exported_auc"], row["exported_logloss"], row["served_bytes"] = served_metrics(trainer, exported, splits)
        rows.append(row)
        print(row, flush=True)

    fp32, result = train(variant_config(base, seed, {}), splits, out / f"fp32_s{seed}")
    record("fp32", fp32, result, "fp32")
    for precision in PTQ_PRECISIONS:
        auc, logloss, size = served_metrics(fp32, precision, splits)
        rows.append({"variant": f"ptq@{precision}", "seed": seed, "test_auc": auc, "test_logloss": logloss, "served_bytes": size})
        print(rows[-1], flush=True)
    for rounding in ("nearest", "stochastic"):
        settings = {"precision": "fp16", "low_precision": {"fp16_rounding": rounding}}
        trainer, result = train(variant_config(base, seed, settings), splits, out / f"fp16_{rounding}_s{seed}")
        record(f"fp16-{rounding}", trainer, result, "fp16")
    for b in bits:
        steps = grid_steps(fp32, b)
        for scheme in ("lpt", "alpt"):
            quant = {"qat": scheme, "bits": b, "table_steps": steps, "step_lr": lr_scale * statistics.median(steps.values())}
            trainer, result = train(variant_config(base, seed, {"low_precision": quant}), splits, out / f"{scheme}{b}_s{seed}")
            record(f"{scheme}@int{b}", trainer, result, f"int{b}")
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        entry: dict[str, Any] = {"variant": variant, "seeds": len(mine)}
        for key in ("test_auc", "exported_auc", "served_bytes", "train_samples_per_s"):
            values = [r[key] for r in mine if key in r]
            if values:
                entry[key] = statistics.mean(values)
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0], "results/precision")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--bits", type=int, nargs="*", default=[8, 4, 2], help="QAT widths (none: no QAT runs)")
    p.add_argument("--alpt-lr-scale", type=float, default=0.01, help="ALPT step lr = scale x initial step")
    args = p.parse_args(argv)
    base = load_config(args.config, args.set, {})
    data = dict(base["data"])
    validation_in_train = bool(data.pop("validation_in_train", False))
    splits = load_dataset(data.pop("name"), **data)
    if validation_in_train:
        splits = splits.with_validation_in_train()
    out = Path(args.out)
    rows = [row for seed in args.seeds for row in run_seed(base, seed, args.bits, splits, out, args.alpt_lr_scale)]
    summary = summarize(rows)
    print(f"{'variant':<18} {'test AUC':>18} {'exported AUC':>18} {'served bytes':>13}")
    for s in summary:
        exported = f"{s['exported_auc']:.4f} ± {s['exported_auc_std']:.4f}" if "exported_auc" in s else ""
        print(f"{s['variant']:<18} {s['test_auc']:.4f} ± {s['test_auc_std']:.4f} {exported:>18} {int(s.get('served_bytes', 0)):>13,}")
    result = {"config": base, "seeds": args.seeds, "rows": rows, "summary": summary}
    write_json(out / "precision.json", result)
    return result


if __name__ == "__main__":
    main()
