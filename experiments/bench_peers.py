"""DIN on MovieLens-100K: embtab's model against FuxiCTR's DIN, side by side in one process.

    PYTHONPATH=DIR python -m experiments.bench_peers --out results/bench_peers.json

FuxiCTR 2.3.10 is not a dependency. Install it and what its imports need into a folder DIR
(its preprocessing imports ray, which training does not use)::

    pip install --no-deps --target DIR fuxictr==2.3.10 $PACKAGES

with PACKAGES: pandas pyyaml scikit-learn scipy h5py joblib threadpoolctl python-dateutil pytz six
tzdata ray msgpack pyarrow protobuf grpcio jsonschema jsonschema-specifications referencing
rpds-py attrs click filelock packaging requests urllib3 idna certifi charset-normalizer aiosignal
frozenlist narwhals.

FuxiCTR's `DIN` (from the wheel's ``model_zoo/LongCTR``) trains on the same split, batches and
order: width 16, attention MLP (80, 40) with Dice (FuxiCTR's default), head MLP (200, 80) with Dice,
Adam 1e-3 on every parameter and FuxiCTR's own `train_step` (gradient-norm clipping included).
embtab's side is ``experiments/configs/din_movielens.toml`` (sigmoid in the attention unit, as in
the DIN authors' code), and the same with Dice there (``embtab_dice_attention``, as FuxiCTR). The
three alternate epoch by epoch on 2 threads, so a slow phase of this machine slows all of them;
only the training loop is timed (forward, loss, backward, optimizer step), and test AUC is taken
after every epoch.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc
from torchrec import JaggedTensor

import embtab
from data import CTRDataset, load_dataset
from data.batch import Batch
from data.loader import make_dataloader
from experiments.common import parser, write_json
from experiments.timing import time_steps
from experiments.ctr import load_config, model_from_config, train_config

CONFIG = "experiments/configs/din_movielens.toml"
USER_FEATURES = ("user_id", "gender", "age", "occupation")
ITEM_FEATURES = ("item_id", "item_genre")
HISTORY_FEATURES = ("hist_item_ids", "hist_genres")

Step = Callable[[Any, torch.Tensor], None]


def fuxictr_din(cardinality: dict[str, int], folder: Path) -> nn.Module:
    """FuxiCTR's DIN over the MovieLens features (ids shifted by one: 0 is FuxiCTR's padding)."""
    spec = importlib.util.find_spec("fuxictr")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "bench_peers needs FuxiCTR 2.3.10 on PYTHONPATH; see `python -m experiments.bench_peers -h`"
        )
    sys.path.insert(0, str(Path(spec.origin).parents[1]))  # the wheel ships model_zoo next to fuxictr
    try:
        from fuxictr.features import FeatureMap
        from model_zoo.LongCTR.DIN.DIN import DIN
    except ImportError as error:
        message = f"FuxiCTR is installed but cannot be imported ({error}); see the module docstring"
        raise SystemExit(message) from error

    feature_map = FeatureMap("movielens", str(folder))
    feature_map.labels, feature_map.default_emb_dim = ["label"], 16
    for name in (*USER_FEATURES, *ITEM_FEATURES):
        feature_map.features[name] = {
            "type": "categorical",
            "source": "item" if name in ITEM_FEATURES else "user",
            "vocab_size": cardinality[name] + 1,
            "padding_idx": 0,
        }
    feature_map.num_fields = len(feature_map.features)
    feature_map.set_column_index()
    model = DIN(
        feature_map,
        embedding_dim=16,
        attention_hidden_units=[80, 40],
        attention_hidden_activations="Dice",
        dnn_hidden_units=[200, 80],
        dnn_activations="Dice",
        learning_rate=1e-3,
        optimizer="adam",
        loss="binary_crossentropy",
        verbose=0,
        model_root=str(folder),
        metrics=["AUC"],
    )
    model._batch_index, model._max_gradient_norm = 0, 10.0
    return model


def fuxictr_inputs(batch: Batch, history_len: int) -> tuple[dict, dict, torch.Tensor]:
    """One batch in FuxiCTR's LongCTR layout: user features, item features ``[B, L + 1]`` (history,
    then the candidate last) and the history mask ``[B, L]``."""
    per_key = batch.sparse.to_dict()
    batch_dict = {name: per_key[name].values() + 1 for name in USER_FEATURES}
    batch_dict["label"] = batch.labels
    item_dict = {}
    for item, history in zip(ITEM_FEATURES, HISTORY_FEATURES):
        shifted = JaggedTensor(values=per_key[history].values() + 1, lengths=per_key[history].lengths())
        padded = shifted.to_padded_dense(history_len, padding_value=0)
        item_dict[item] = torch.cat([padded, (per_key[item].values() + 1).unsqueeze(1)], dim=1)
    lengths = per_key[HISTORY_FEATURES[0]].lengths()
    mask = torch.arange(history_len) < lengths.unsqueeze(1)
    return batch_dict, item_dict, mask


def embtab_side(splits, config: dict[str, Any]) -> tuple[nn.Module, Step, Callable[[Any], torch.Tensor]]:
    train = train_config(config["train"])
    model, _ = model_from_config(config, splits, train)
    fused = embtab.fuse(model, train.sparse())
    optimizer = torch.optim.Adam(embtab.dense_parameters(fused), lr=train.dense_lr, fused=True)

    def step(batch: Batch, labels: torch.Tensor) -> None:
        optimizer.zero_grad()
        logits = fused(batch.sparse, batch.dense)
        nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
        optimizer.step()

    return fused, step, lambda batch: torch.sigmoid(fused(batch.sparse, batch.dense))


def fuxictr_side(model: nn.Module) -> tuple[nn.Module, Step, Callable[[Any], torch.Tensor]]:
    def step(inputs, labels: torch.Tensor) -> None:
        model.train_step(inputs)

    return model, step, lambda inputs: model(inputs)["y_pred"].squeeze(-1)


def batches_of(ds: CTRDataset, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[Batch]:
    return list(make_dataloader(ds, batch_size, shuffle=shuffle, seed=seed, epoch=epoch))


def train_epoch(model: nn.Module, step: Step, batches: list) -> float:
    """Seconds of the training loop over `batches` (each an ``(inputs, labels)`` pair)."""
    model.train()
    return time_steps(lambda batch: step(*batch), batches, collect_garbage=False)


@torch.no_grad()
def auc_on(model: nn.Module, predict: Callable[[Any], torch.Tensor], batches: list) -> float:
    model.eval()
    scores = torch.cat([predict(inputs) for inputs, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    return float(binary_auroc(scores, labels.long()))


def run(args: Any) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    config = load_config(CONFIG, [], {})
    torch.manual_seed(args.seed)
    splits = load_dataset("movielens")
    history_len = int(max(splits.train[:].sparse[HISTORY_FEATURES[0]].lengths().max(), 1))
    cardinality = {f.name: f.cardinality for f in splits.feature_specs()}
    with tempfile.TemporaryDirectory() as folder:
        dice = load_config(CONFIG, ["model.attention_activation=dice"], {})
        sides = {
            "embtab": (embtab_side(splits, config), lambda b: b),
            "embtab_dice_attention": (embtab_side(splits, dice), lambda b: b),
            "fuxictr": (
                fuxictr_side(fuxictr_din(cardinality, Path(folder))),
                lambda b: fuxictr_inputs(b, history_len),
            ),
        }
        test_batches = batches_of(splits.test, 4096, args.seed, 0, shuffle=False)
        test = {name: [(convert(b), b.labels) for b in test_batches] for name, (_, convert) in sides.items()}
        per_side = {name: {"samples_per_s": [], "test_auc": []} for name in sides}
        for epoch in range(args.epochs):
            train = batches_of(splits.train, args.batch_size, args.seed, epoch, shuffle=True)
            for name, ((model, step, predict), convert) in sides.items():
                seconds = train_epoch(model, step, [(convert(b), b.labels) for b in train])
                auc = auc_on(model, predict, test[name])
                rate = len(splits.train) / seconds
                per_side[name]["samples_per_s"].append(rate)
                per_side[name]["test_auc"].append(auc)
                print(f"epoch {epoch + 1} {name:21s} {rate:>8,.0f} samples/s | test AUC {auc:.4f}")
    peer = per_side["fuxictr"]["samples_per_s"]
    speedup = {
        name: [a / b for a, b in zip(side["samples_per_s"], peer)]
        for name, side in per_side.items()
        if name != "fuxictr"
    }
    for name, ratios in speedup.items():
        print(f"{name} / FuxiCTR training samples/s per epoch: " + ", ".join(f"{r:.2f}x" for r in ratios))
    payload = {
        "benchmark": "bench_peers",
        "config": vars(args),
        "threads": args.threads,
        "train_samples": len(splits.train),
        "sides": per_side,
        "speedup_vs_fuxictr_per_epoch": speedup,
    }
    write_json(args.out, payload)
    return payload


def main() -> None:
    p = parser(__doc__.splitlines()[0], "results/bench_peers.json")
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    run(p.parse_args())


if __name__ == "__main__":
    main()
