"""Fault injection: damaged and planted checkpoints, resumes of another run, two runs on one
output folder, interrupted writes, and store files changed under an open store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from embtab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from embtab.files import FolderBusyError, FolderLock, atomic_write, atomic_write_text
from embtab.offload import MmapStore
from embtab.offload.store import StoreChangedError
from experiments.ctr import run
from experiments.trainer import BEST, CHECKPOINT

TINY = {
    "data": {"name": "synthetic", "num_samples": 2000, "num_fields": 3, "cardinalities": 200, "dense_dim": 2},
    "model": {"name": "dlrm", "bottom_hidden": [8], "top_hidden": [8]},
    "embedding": {"dim": 4, "method": {"name": "full"}},
    "train": {"epochs": 1, "batch_size": 256, "progress": False},
}


def with_(config: dict, section: str, **changes) -> dict:
    return {**config, section: {**config[section], **changes}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The output folder of a finished one-epoch run of TINY (copied per test that changes it)."""
    out = tmp_path_factory.mktemp("finished")
    run(TINY, out)
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    target.mkdir()
    for path in folder.iterdir():
        if path.is_file() and path.name != ".lock":
            (target / path.name).write_bytes(path.read_bytes())
    return target


# ------------------------------------------------------------------------------ another run's checkpoint
@pytest.mark.parametrize(
    ("section", "changes", "field"),
    [
        # same table shapes as the full table (rows = cardinality): only the identity tells them apart
        ("embedding", {"method": {"name": "hashing_trick", "rows": 200}}, "embedding.method.name"),
        ("train", {"batch_size": 128}, "train.batch_size"),
        ("data", {"seed": 7}, "data.seed"),
        ("train", {"sparse_lr": 0.1}, "train.sparse_lr"),
    ],
)
def test_resuming_another_run_is_refused_naming_the_field(finished, tmp_path, section, changes, field):
    out = copy_of(finished, tmp_path)
    before = (out / "result.json").read_bytes()
    with pytest.raises(CheckpointError, match=f"belongs to another run: .*{field}: checkpoint"):
        run(with_(TINY, section, **changes), out)
    assert (out / "result.json").read_bytes() == before


def test_other_data_under_the_same_config_is_refused(finished, tmp_path):
    """The data fingerprint catches what the config cannot see (here: another number of samples
    read as the same dataset name would be another file)."""
    from data import make_synthetic
    from experiments.ctr import model_from_config, train_config
    from experiments.trainer import Trainer

    out = copy_of(finished, tmp_path)
    splits = make_synthetic(num_samples=2000, num_fields=3, cardinalities=200, dense_dim=2, seed=5)
    model, _ = model_from_config(TINY, splits, train_config(TINY["train"]))
    described = {s: TINY[s] for s in ("data", "model", "embedding")}
    with pytest.raises(CheckpointError, match="data_fingerprint"):
        Trainer(model, splits, train_config(TINY["train"]), out, described=described)


def test_more_epochs_continue_a_finished_run(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    more = run(with_(TINY, "train", epochs=2, patience=5), out)
    assert more["epochs_run"] == 2 and len(more["history"]) == 2


# ------------------------------------------------------------------------------ damaged and planted files
@pytest.mark.parametrize("name", [CHECKPOINT, BEST])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_checkpoint_is_named_with_what_to_do(finished, tmp_path, name, damage):
    out = copy_of(finished, tmp_path)
    data = bytearray((out / name).read_bytes())
    if damage == "flip":
        for position in range(len(data) - 4000, len(data) - 100, 97):
            data[position] ^= 0xFF
    else:
        data = data[: len(data) * 2 // 3]
    (out / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name} is damaged.*Restore it from a copy, or start over"):
        run(with_(TINY, "train", epochs=2, patience=5), out)


class Planted:
    """Unpickling it would create `marker`: code run from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_checkpoint_runs_no_code(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"training": Planted(marker)}, out / CHECKPOINT)  # a plain pickle
    with pytest.raises(CheckpointError, match="not an embtab checkpoint"):
        run(TINY, out)
    save_checkpoint(out / CHECKPOINT, {"training": Planted(marker)}, {})  # right header and checksum
    with pytest.raises(CheckpointError, match="not plain tensors"):
        load_checkpoint(out / CHECKPOINT)
    assert not marker.exists()


def test_checkpoint_round_trip_and_safe_fields(tmp_path):
    payload = {"w": torch.arange(6.0).view(2, 3), "run": {"epoch": 2, "history": [{"auc": 0.7}]}}
    save_checkpoint(tmp_path / "c.pt", payload, {"train": {"epochs": 1, "seed": 3}})
    loaded = load_checkpoint(tmp_path / "c.pt", {"train": {"epochs": 4, "seed": 3}}, ["train.epochs"])
    assert torch.equal(loaded["w"], payload["w"]) and loaded["run"] == payload["run"]
    with pytest.raises(CheckpointError, match=r"train.seed: checkpoint 3, this run 4"):
        load_checkpoint(tmp_path / "c.pt", {"train": {"epochs": 1, "seed": 4}}, ["train.epochs"])


# ------------------------------------------------------------------------------ output folders
def test_a_second_run_on_a_busy_folder_fails_at_once(tmp_path):
    out = tmp_path / "busy"
    with FolderLock(out):
        with pytest.raises(FolderBusyError, match=f"{out} is in use by another process .*pid {os.getpid()}"):
            run(TINY, out)
        assert not (out / CHECKPOINT).exists()
    assert run(TINY, out)["test_auc"] > 0.5  # free again once released


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "result.json", json.dumps({"auc": 0.7}))

    def crash(file) -> None:
        file.write(b'{"auc": 0.')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"auc": 0.7}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_writers_use_unique_temporaries(tmp_path, monkeypatch):
    """Two writers of one file never share a temporary: each rename moves its own complete file."""
    seen: list[str] = []
    real_replace = os.replace

    def spy(source, destination):
        seen.append(str(source))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write_text(tmp_path / "checkpoint.pt", "a")
    atomic_write_text(tmp_path / "checkpoint.pt", "b")
    assert len(set(seen)) == 2 and all(Path(s).parent == tmp_path for s in seen)


# ------------------------------------------------------------------------------ store files
def test_creating_a_store_over_an_existing_one_needs_overwrite(tmp_path):
    path = tmp_path / "item.store"
    with MmapStore.create(path, 100, 4, 1) as store:
        store.weights[:] = 7.0
    with pytest.raises(FileExistsError, match="already exists .*overwrite=True"):
        MmapStore.create(path, 100, 4, 1)
    with MmapStore.open(path, 100, 4, 1) as store:
        assert store.weights.eq(7.0).all()
    with MmapStore.create(path, 100, 4, 1, overwrite=True) as store:
        assert not store.weights.eq(7.0).any()


@pytest.mark.parametrize("change", ["delete", "truncate", "replace"])
def test_a_store_file_changed_under_the_store_raises_before_rows_are_lost(tmp_path, change):
    path = tmp_path / "item.store"
    store = MmapStore.create(path, 1000, 4, 1)
    rows = torch.tensor([3, 999])
    if change == "delete":
        path.unlink()
    elif change == "truncate":
        os.truncate(path, 4096 + 16)  # reading row 999 would be a SIGBUS
    else:
        path.unlink()
        MmapStore.create(path, 1000, 4, 1).close()
    with pytest.raises(StoreChangedError, match=f"item.store' was {change}"):
        store.write(rows, torch.ones(2, 4), torch.ones(2, 1))
    with pytest.raises(StoreChangedError):
        store.read(rows)
    with pytest.raises(StoreChangedError):
        store.close()
