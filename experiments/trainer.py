"""The trainer: fits and evaluates a CTR model whose embeddings are embtab tables.

BCE loss; AUC and logloss through torchmetrics; early stopping on validation AUC; checkpoints that
hold everything a run needs to continue (weights, fused sparse optimizer state, dense optimizer,
data position, RNG, early-stopping state), so a resumed run ends exactly where an uninterrupted one
would. Everything a run produces goes under its output folder.

Distributed (a `process_group` of several ranks, e.g. under torchrun): the tables are sharded by
`embtab.fuse`, every rank trains on its share of each global batch with the loss scaled so that the
steps are those of one process on the global batch, evaluation gathers every rank's predictions,
and only rank 0 writes files (checkpoints hold whole tables, loadable by any number of ranks).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import polars as pl
import torch
import torch.distributed as dist
from torch import nn
from torchmetrics.functional.classification import binary_auroc
from tqdm import tqdm

import embtab
from data import Batch, CTRDataset, DatasetSplits, make_dataloader
from data.loader import BatchIndexSampler
from models.output import ModelOutput
from embtab.collectives import gather_rows, rank_and_world
from embtab.offload import OffloadedTraining
from embtab.checkpoint import load_checkpoint, load_training_state, save_checkpoint, training_state
from embtab.checks import check_field_types
from embtab.files import FolderLock, atomic_write
from embtab.shard import ShardingConstraints, embedding_tables_of, format_plan, global_mean

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.csv"

# Fields of a run's identity that a resume may change: more epochs or more patience continue a
# finished run; the others change only speed, display, evaluation batching or when checkpoints are
# written. Everything else (data, model, embedding, batch size, seed, learning rates, ...) must match.
SAFE_TO_CHANGE: tuple[str, ...] = tuple(
    f"train.{name}"
    for name in ("epochs", "patience", "restore_best", "checkpoint_every", "progress", "threads", "eval_batch_size")
)


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained; the same protocol for every embedding method."""

    epochs: int = 1
    batch_size: int = 1024
    eval_batch_size: int = 8192
    dense_lr: float = 1e-3
    sparse_optimizer: str = "rowwise_adagrad"
    sparse_lr: float = 0.05
    seed: int = 2024
    threads: int = 2
    patience: int = 1
    restore_best: bool = True
    checkpoint_every: int = 0
    progress: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_field_types(self, "[train]")
        for name in ("epochs", "batch_size", "eval_batch_size", "threads", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"[train]: {name} = {getattr(self, name)!r}, expected an integer >= 1")
        if self.checkpoint_every < 0:
            raise ValueError(f"[train]: checkpoint_every = {self.checkpoint_every!r}, expected >= 0 (0: at epoch ends only)")
        for name in ("dense_lr", "sparse_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"[train]: {name} = {getattr(self, name)!r}, expected a number > 0")

    def sparse(self) -> embtab.SparseOptimizer:
        return embtab.SparseOptimizer(self.sparse_optimizer, lr=self.sparse_lr)


@dataclass
class RunState:
    """Where a run is: the data position and the early-stopping bookkeeping."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_auc: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    train_seconds: float = 0.0
    train_samples: int = 0
    data_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = False


@dataclass(frozen=True)
class Evaluation:
    auc: float
    logloss: float
    samples: int
    seconds: float


def run_identity(
    model: nn.Module, splits: DatasetSplits, config: TrainConfig, described: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What a run's checkpoints belong to: the caller's description (e.g. the configuration's
    [data], [model] and [embedding] tables), the training configuration, every embedding spec, the
    model's class and parameter shapes, and a fingerprint of the data."""
    return {
        **dict(described or {}),
        "train": asdict(config),
        "embedding_specs": [spec_identity(t.spec) for t in embedding_tables_of(model)],
        "model_structure": {
            "class": type(model).__name__,
            "parameters": {n: list(p.shape) for n, p in model.named_parameters()},
        },
        "data_fingerprint": splits.fingerprint(),
    }


def spec_identity(spec: embtab.EmbeddingSpec) -> dict[str, Any]:
    """An embedding spec as plain data."""
    return {
        "dim": spec.dim,
        "method": spec.method.to_dict(),
        "table_methods": {name: method.to_dict() for name, method in spec.table_methods},
        "features": [asdict(f) for f in spec.features],
    }


class Trainer:
    """Fits `model` on `splits` with `config`, writing metrics and checkpoints to `out_dir`.

    The output folder is locked while the trainer works in it (a second run on it fails at once).
    A checkpoint found there is resumed only if it belongs to this run (`run_identity`; `described`
    adds the caller's own description): any other difference than those of `SAFE_TO_CHANGE` is
    refused, naming the field.

    Example::

        trainer = Trainer(model, splits, TrainConfig(epochs=2), out_dir="results/run")
        result = trainer.fit()          # resumes from out_dir/checkpoint.pt if present
        result["test_auc"]
    """

    def __init__(
        self,
        model: nn.Module,
        splits: DatasetSplits,
        config: TrainConfig,
        out_dir: str | Path,
        stop_after_steps: int | None = None,
        process_group: dist.ProcessGroup | None = None,
        constraints: ShardingConstraints | None = None,
        described: Mapping[str, Any] | None = None,
    ) -> None:
        _check_not_empty(splits)
        torch.set_num_threads(config.threads)
        self.config = config
        self.splits = splits
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stop_after_steps = stop_after_steps
        self.group = process_group
        self.rank, self.world = rank_and_world(process_group) if process_group else (0, 1)
        self.writes = self.rank == 0
        self.device = torch.device(config.device)
        self.identity = run_identity(model, splits, config, described)
        self._lock: FolderLock | None = None
        self._hold_folder()
        try:
            self._build(model, constraints)
        except BaseException:
            self.release()
            raise

    def _build(self, model: nn.Module, constraints: ShardingConstraints | None) -> None:
        config, process_group = self.config, self.group
        self.model = embtab.fuse(
            model, config.sparse(), self.device, process_group=process_group, constraints=constraints
        )
        self.plan = format_plan(self.model.plan)
        self.offloaded = OffloadedTraining.of(model, self.model, config.sparse_optimizer, config.seed, self.world)
        self.dense_optimizer = torch.optim.Adam(
            embtab.dense_parameters(self.model), lr=config.dense_lr, fused=True
        )
        self.state = RunState()
        if self.offloaded is not None:
            self._check_offload_fits_evaluation(self.offloaded)
        self._resume()

    # ------------------------------------------------------------------ output folder
    def _hold_folder(self) -> None:
        """Lock the output folder (rank 0, which writes): a second run on it fails at once."""
        if self.writes and (self._lock is None or not self._lock.held):
            self._lock = FolderLock(self.out_dir, "run")

    def release(self) -> None:
        """Unlock the output folder (`fit` does it when it returns)."""
        if self._lock is not None:
            self._lock.release()

    # ------------------------------------------------------------------ offloaded tables
    def _batches(self, loader, train: bool):
        """`loader`, or with offloaded tables a `Prefetcher` over it (each batch's rows cached
        ahead; closing it writes the trained rows back)."""
        if self.offloaded is None:
            return contextlib.nullcontext(loader)
        return self.offloaded.batches(loader, train=train)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> dict[str, Any]:
        return {
            "offload": self.offloaded.state_dict() if self.offloaded is not None else {},
            "training": training_state(self.model),
            "dense_optimizer": self.dense_optimizer.state_dict(),
            "run": asdict(self.state),
            "rng": self._rng_states(),
            "config": asdict(self.config),
        }

    def _rng_states(self) -> list[torch.Tensor]:
        """Every rank's RNG state (dropout differs per rank), in rank order."""
        states = [torch.get_rng_state()] * self.world
        if self.world > 1:
            dist.all_gather_object(states, states[0], group=self.group)
        return states

    def _save(self, name: str) -> None:
        """Write atomically with the run's identity and a checksum (`embtab.checkpoint`): a crash
        mid-write leaves the previous file intact. Every rank takes part in gathering the sharded
        tables; rank 0 writes; the others wait until it has."""
        checkpoint = self._checkpoint()
        if self.writes:
            save_checkpoint(self.out_dir / name, checkpoint, self.identity)
        if self.world > 1:
            dist.barrier(self.group)

    def _load(self, name: str) -> None:
        """Restore a checkpoint of this run (checksum and identity checked before anything changes)."""
        saved = load_checkpoint(self.out_dir / name, self.identity, SAFE_TO_CHANGE)
        load_training_state(self.model, saved["training"])
        if self.offloaded is not None:
            self.offloaded.load_state_dict(self.model, saved["offload"])
        self.dense_optimizer.load_state_dict(saved["dense_optimizer"])
        self.state = RunState(**saved["run"])
        self.state.finished = self._finished()
        rng = saved["rng"]
        torch.set_rng_state(rng[self.rank] if len(rng) == self.world else rng[0])

    def _resume(self) -> None:
        if (self.out_dir / CHECKPOINT).exists():
            self._load(CHECKPOINT)

    # ------------------------------------------------------------------ training
    def _loss(self, batch, global_batch: int) -> torch.Tensor:
        """This rank's share of the global batch's mean loss (the mean itself on one process)."""
        out: ModelOutput = self.model(batch.sparse, batch.dense, with_aux_loss=True)
        losses = nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels, reduction="none")
        return out.loss(global_mean(losses, global_batch, self.world))

    def _on_device(self, batch: Batch) -> Batch:
        return batch if self.device.type == "cpu" else batch.to(self.device, non_blocking=True)

    def _user_model(self) -> nn.Module:
        module = self.model.module
        return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; False if stopped early by `stop_after_steps`."""
        state, config = self.state, self.config
        loader = make_dataloader(
            self.splits.train,
            config.batch_size,
            shuffle=True,
            seed=config.seed,
            epoch=state.epoch,
            start_batch=state.batch,
            part=(self.rank, self.world),
        )
        self.model.train()
        progress = tqdm(
            total=len(loader) + state.batch,
            initial=state.batch,
            disable=not (config.progress and self.writes),
            desc=f"epoch {state.epoch + 1}",
            unit="batch",
            leave=False,
        )
        with self._batches(loader, train=True) as batches:
            finished = self._train_batches(batches, loader.batch_sampler, progress)
        progress.close()
        return finished

    def _train_batches(self, batches, sampler: BatchIndexSampler, progress: tqdm) -> bool:
        """Train on `batches` until they run out (True) or `stop_after_steps` is reached (False)."""
        state, config = self.state, self.config
        tick = time.perf_counter()
        for batch in batches:
            batch = self._on_device(batch)
            fetched = time.perf_counter()
            global_batch = sampler.global_batch_size(state.batch)
            self.dense_optimizer.zero_grad()
            self._loss(batch, global_batch).backward()
            self.dense_optimizer.step()
            done = time.perf_counter()
            state.data_seconds += fetched - tick
            state.train_seconds += done - tick
            state.train_samples += global_batch
            state.batch += 1
            state.step += 1
            progress.update(1)
            progress.set_postfix(samples_per_s=f"{state.train_samples / state.train_seconds:,.0f}")
            if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                self._save(CHECKPOINT)
            if self.stop_after_steps is not None and state.step >= self.stop_after_steps:
                return False
            tick = time.perf_counter()
        return True

    def _end_epoch(self) -> None:
        state = self.state
        valid = self.evaluate(self.splits.valid)
        state.history.append(
            {
                "epoch": state.epoch + 1,
                "step": state.step,
                "valid_auc": valid.auc,
                "valid_logloss": valid.logloss,
                "train_samples_per_s": state.train_samples / max(state.train_seconds, 1e-9),
            }
        )
        if self.writes:
            history = pl.DataFrame(state.history)
            atomic_write(self.out_dir / METRICS, history.write_csv)
        state.epoch += 1
        state.batch = 0
        if valid.auc > state.best_auc:
            state.best_auc, state.best_epoch, state.bad_epochs = valid.auc, state.epoch, 0
            self._save(BEST)
        else:
            state.bad_epochs += 1
        state.finished = self._finished()
        self._save(CHECKPOINT)

    def _finished(self) -> bool:
        """The epochs have run out or validation AUC has stopped improving (under this config:
        a resumed run given more epochs or patience continues)."""
        state = self.state
        return state.epoch >= self.config.epochs or state.bad_epochs >= self.config.patience

    def fit(self) -> dict[str, Any]:
        """Train until the epochs run out or validation AUC stops improving; then test the best
        epoch. The output folder stays locked until it returns."""
        self._hold_folder()
        try:
            while not self.state.finished:
                if not self._train_epoch():
                    return {"stopped_at_step": self.state.step}
                self._end_epoch()
            return self._final_result()
        finally:
            self.release()

    def _final_result(self) -> dict[str, Any]:
        final = self.state
        if self.config.restore_best:
            self._load(BEST)
        test = self.evaluate(self.splits.test)
        self.state = final
        result = {
            "test_auc": test.auc,
            "test_logloss": test.logloss,
            "best_epoch": final.best_epoch,
            "valid_auc": final.best_auc,
            "epochs_run": len(final.history),
            "train_samples_per_s": final.train_samples / max(final.train_seconds, 1e-9),
            "train_seconds_per_epoch": final.train_seconds / max(len(final.history), 1),
            "data_seconds_fraction": final.data_seconds / max(final.train_seconds, 1e-9),
            "inference_samples_per_s": test.samples / max(test.seconds, 1e-9),
            "history": final.history,
        }
        return result

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, dataset: CTRDataset) -> Evaluation:
        """AUC (torchmetrics) and logloss of the model on `dataset` (every rank's share gathered)."""
        self.model.eval()
        logits, labels = [], []
        start = time.perf_counter()
        batch_size = self._eval_batch_size(len(dataset))
        loader = make_dataloader(dataset, batch_size, shuffle=False, part=(self.rank, self.world))
        with self._batches(loader, train=False) as batches:
            for batch in batches:
                batch = self._on_device(batch)
                logits.append(self.model(batch.sparse, batch.dense))
                labels.append(batch.labels)
        seconds = time.perf_counter() - start
        self.model.train()
        logits_all = gather_rows(torch.cat(logits), self.group)
        labels_all = gather_rows(torch.cat(labels), self.group)
        auc = float(binary_auroc(torch.sigmoid(logits_all), labels_all.long()))
        logloss = float(nn.functional.binary_cross_entropy_with_logits(logits_all, labels_all))
        return Evaluation(auc=auc, logloss=logloss, samples=len(labels_all), seconds=seconds)

    def _check_offload_fits_evaluation(self, offloaded: OffloadedTraining) -> None:
        """Every evaluation batch's distinct rows must fit each offload cache: checked over the
        validation and test splits before training starts (and every id range-checked)."""
        for split, dataset in (("valid", self.splits.valid), ("test", self.splits.test)):
            size = self._eval_batch_size(len(dataset))
            loader = make_dataloader(dataset, size, shuffle=False, part=(self.rank, self.world))
            offloaded.check_fits((batch.sparse for batch in loader), size, split)

    def _eval_batch_size(self, samples: int) -> int:
        """The configured evaluation batch, made smaller if needed so that the last batch still
        gives every rank at least one sample (no sample is left out of the metrics)."""
        size = self.config.eval_batch_size
        while size > self.world and 0 < samples % size < self.world:
            size -= 1
        return size


def _check_not_empty(splits: DatasetSplits) -> None:
    """Every split must hold samples (an empty one would fail at evaluation, after training)."""
    for split in ("train", "valid", "test"):
        if len(getattr(splits, split)) == 0:
            raise ValueError(
                f"dataset {splits.name!r}: the {split} split is empty; expected samples in every split "
                "(more data, or other split fractions)"
            )
