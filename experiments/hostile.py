"""Hostile-user harness: try the classes of bad input and faults a careless or hostile user
produces, and count the verdicts.

    python -m experiments.hostile --out results/hostile.json

Each case does one thing through the public entry points (`experiments.ctr.run`, the data
readers, `MmapStore`, the offload caches, the engine) and gets one verdict:

- ``clear error``: an exception of an ordinary kind (ValueError, OSError, RuntimeError) whose
  message names what is wrong (the case's key words), before damage is done;
- ``correct``: the right result (valid input accepted, a resume that continues as asked);
- ``silent wrong``: no error but a wrong result (a typo ignored, another file read, ...);
- ``crash``: an exception that is foreign or cryptic (wrong kind, or not naming the problem), or
  the process killed by a signal;
- ``loss``: trained rows or results lost or overwritten;
- ``security hole``: code run from a file, or a write outside the folder it belongs in.

The cases only use APIs that exist before and after the reliability work (issue 15), so the same
script measures both (run it from each checkout; ``--cases`` filters by name).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import polars as pl
import torch

CLEAR, CORRECT, SILENT, CRASH, LOSS, SECURITY = (
    "clear error", "correct", "silent wrong", "crash", "loss", "security hole",
)  # fmt: skip
ORDINARY = (ValueError, OSError, RuntimeError)

TINY: dict[str, Any] = {
    "data": {"name": "synthetic", "num_samples": 1500, "num_fields": 3, "cardinalities": 150, "dense_dim": 2},
    "model": {"name": "dlrm", "bottom_hidden": [8], "top_hidden": [8]},
    "embedding": {"dim": 4, "method": {"name": "full"}},
    "train": {"epochs": 1, "batch_size": 256, "progress": False},
}

CASES: list[tuple[str, str, Callable[[Path], str]]] = []


def case(group: str, name: str):
    def register(function: Callable[[Path], str]) -> Callable[[Path], str]:
        CASES.append((group, name, function))
        return function

    return register


def expect_error(action: Callable[[], Any], *words: str | tuple[str, ...]) -> str:
    """CLEAR if `action` raises an ordinary error naming every one of `words` (a tuple: any of
    its words), CRASH for any other exception, SILENT if it does not raise."""
    try:
        action()
    except ORDINARY as error:
        message = str(error).lower()
        named = all(any(w.lower() in message for w in (word if isinstance(word, tuple) else (word,))) for word in words)
        return CLEAR if named else CRASH
    except Exception:
        return CRASH
    return SILENT


def with_(config: dict, section: str, **changes: Any) -> dict:
    return {**config, section: {**config[section], **changes}}


def run(config: dict, out: Path, **kwargs: Any) -> dict:
    from experiments.ctr import run as ctr_run

    return ctr_run(config, out, **kwargs)


# ------------------------------------------------------------------------------ configuration
CONFIG_CASES = [
    ("unknown section", {**TINY, "trian": {"epochs": 2}}, ("trian",)),
    ("unknown [train] key", with_(TINY, "train", epoch=2), ("epoch",)),
    ("unknown [embedding] key", with_(TINY, "embedding", dims=8), ("dims",)),
    ("unknown [embedding.method] key", with_(TINY, "embedding", method={"name": "hashing_trick", "rowz": 64}), ("rowz",)),
    ("unknown [model] key", with_(TINY, "model", top_hiden=[4]), ("top_hiden",)),
    ("unknown [data] key", with_(TINY, "data", num_sample=100), ("num_sample",)),
    ("dim = 12.9", with_(TINY, "embedding", dim=12.9), ("dim",)),
    ("dim = '8'", with_(TINY, "embedding", dim="8"), ("dim",)),
    ("dim = 0", with_(TINY, "embedding", dim=0), ("dim",)),
    ("epochs = 0", with_(TINY, "train", epochs=0), ("epochs",)),
    ("epochs = 1.5", with_(TINY, "train", epochs=1.5), ("epochs",)),
    ("epochs = '2'", with_(TINY, "train", epochs="2"), ("epochs",)),
    ("batch_size = 0", with_(TINY, "train", batch_size=0), ("batch_size",)),
    ("batch_size = -8", with_(TINY, "train", batch_size=-8), ("batch_size",)),
    ("progress = 'false'", with_(TINY, "train", progress="false"), ("progress",)),
    ("sparse_lr = nan", with_(TINY, "train", sparse_lr=float("nan")), ("sparse_lr",)),
    ("dense_lr = -1", with_(TINY, "train", dense_lr=-1.0), ("dense_lr",)),
    ("budget_bytes = 0", with_(TINY, "embedding", budget_bytes=0, method={"name": "hashing_trick"}), ("budget",)),
    ("budget_bytes = -5", with_(TINY, "embedding", budget_bytes=-5, method={"name": "hashing_trick"}), ("budget",)),
    ("budget_bytes = nan", with_(TINY, "embedding", budget_bytes=float("nan"), method={"name": "hashing_trick"}), ("budget",)),
    ("budget_bytes = inf", with_(TINY, "embedding", budget_bytes=float("inf"), method={"name": "hashing_trick"}), ("budget",)),
    ("budget_bytes = '4k'", with_(TINY, "embedding", budget_bytes="4k", method={"name": "hashing_trick"}), ("budget",)),
    ("method rows = 9.5", with_(TINY, "embedding", method={"name": "hashing_trick", "rows": 9.5}), ("rows",)),
    ("method rows = '64'", with_(TINY, "embedding", method={"name": "hashing_trick", "rows": "64"}), ("rows",)),
    ("model top_hidden = 4", with_(TINY, "model", top_hidden=4), ("top_hidden",)),
    ("data num_samples = 1500.5", with_(TINY, "data", num_samples=1500.5), ("num_samples",)),
    ("data seed = 'x'", with_(TINY, "data", seed="x"), ("seed",)),
    ("unknown method", with_(TINY, "embedding", method={"name": "hashtrick"}), ("hashtrick",)),
    ("unknown model", with_(TINY, "model", name="dinn"), ("dinn",)),
]


def _config_case(config: dict, words: tuple[str, ...]) -> Callable[[Path], str]:
    return lambda tmp: expect_error(lambda: run(config, tmp / "out"), *words)


for _name, _config, _words in CONFIG_CASES:
    case("config", _name)(_config_case(_config, _words))


def from_command_line(overrides: list[str], flags: dict[str, Any]) -> dict:
    """`experiments.ctr.load_config` of `overrides` and `flags`, on TINY's data, model and train."""
    from experiments.ctr import load_config

    config = load_config(None, overrides, flags)
    config["data"], config["model"] = TINY["data"], TINY["model"]
    config["train"] = {**TINY["train"], **config["train"]}
    return config


@case("config", "--set with a typo")
def _set_typo(tmp: Path) -> str:
    return expect_error(lambda: run(from_command_line(["train.epoch=2"], {}), tmp / "out"), "epoch")


@case("config", "--budget 0")
def _budget_flag(tmp: Path) -> str:
    flags = {"budget": 0, "method": "hashing_trick"}
    return expect_error(lambda: run(from_command_line([], flags), tmp / "out"), "budget")


@case("config", "--epochs 0")
def _epochs_flag(tmp: Path) -> str:
    return expect_error(lambda: run(from_command_line([], {"epochs": 0}), tmp / "out"), "epochs")


# ------------------------------------------------------------------------------ checkpoints and resume
def finished_run(tmp: Path, config: dict = TINY) -> Path:
    out = tmp / "out"
    run(config, out)
    return out


def resume_case(changes: tuple[str, dict], *words: str | tuple[str, ...]) -> Callable[[Path], str]:
    def attempt(tmp: Path) -> str:
        out = finished_run(tmp)
        before = (out / "result.json").read_bytes()
        verdict = expect_error(lambda: run(with_(TINY, changes[0], **changes[1]), out), *words)
        if verdict == SILENT:
            return LOSS if (out / "result.json").read_bytes() != before else SILENT
        return verdict

    return attempt


for _label, _change, _word in [
    ("resume with another method of the same shapes", ("embedding", {"method": {"name": "hashing_trick", "rows": 150}}), "method"),
    ("resume with another data seed", ("data", {"seed": 9}), "seed"),
    ("resume with another sparse lr", ("train", {"sparse_lr": 0.2}), "sparse_lr"),
    # a shape mismatch that names the checkpoint entry and both shapes is clear enough
    ("resume with another model width", ("model", {"top_hidden": [16]}), ("top_hidden", "shape")),
    ("resume with another embedding dim", ("embedding", {"dim": 8}), ("dim", "shape")),
]:
    case("resume", _label)(resume_case(_change, _word))


@case("resume", "more epochs continue a finished run")
def _more_epochs(tmp: Path) -> str:
    out = finished_run(tmp)
    try:
        result = run(with_(TINY, "train", epochs=2, patience=5), out)
    except Exception:
        return CRASH
    return CORRECT if result["epochs_run"] == 2 else SILENT


@case("resume", "another batch size mid-epoch")
def _batch_size_mid_epoch(tmp: Path) -> str:
    config = with_(TINY, "train", checkpoint_every=1)
    run(config, tmp / "out", stop_after_steps=2)
    return expect_error(lambda: run(with_(config, "train", batch_size=128), tmp / "out"), "batch_size")


@case("resume", "another data file under the same name")
def _other_file(tmp: Path) -> str:
    folder = tmp / "data"
    write_schema_dataset(folder, rows=200, seed=0)
    config = {**TINY, "data": {"name": str(folder), "cache_dir": str(tmp / "cache")}}
    run(config, tmp / "out")
    write_schema_dataset(folder, rows=200, seed=1)
    return expect_error(lambda: run(config, tmp / "out"), ("data", "fingerprint"))


def damage_case(name: str, how: str) -> Callable[[Path], str]:
    def attempt(tmp: Path) -> str:
        out = finished_run(tmp)
        data = bytearray((out / name).read_bytes())
        if how == "flip":
            for position in range(len(data) - 3000, len(data) - 100, 89):
                data[position] ^= 0xFF
        else:
            data = data[: len(data) * 2 // 3]
        (out / name).write_bytes(bytes(data))
        resumed = with_(TINY, "train", epochs=2, patience=5) if name == "checkpoint.pt" else TINY  # best.pt: read at the end
        try:
            run(resumed, out)
        except ORDINARY as error:
            return CLEAR if "damaged" in str(error) and name in str(error) else CRASH
        except Exception:
            return CRASH
        return SILENT

    return attempt


for _file in ("checkpoint.pt", "best.pt"):
    for _how in ("flip", "truncate"):
        case("checkpoint", f"{_how} bytes of {_file}")(damage_case(_file, _how))


class _Planted:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@case("checkpoint", "a planted pickle in --out")
def _planted(tmp: Path) -> str:
    out = finished_run(tmp)
    marker = tmp / "code-ran"
    torch.save({"training": _Planted(str(marker))}, out / "checkpoint.pt")
    verdict = expect_error(lambda: run(TINY, out), "checkpoint")
    return SECURITY if marker.exists() else verdict


@case("checkpoint", "a second run on a folder in use")
def _second_run(tmp: Path) -> str:
    from experiments.ctr import model_from_config, train_config
    from experiments.trainer import Trainer
    from data import load_dataset

    data = dict(TINY["data"])
    splits = load_dataset(data.pop("name"), **data)
    train = train_config(TINY["train"])
    first = Trainer(model_from_config(TINY, splits, train)[0], splits, train, tmp / "out")
    verdict = expect_error(lambda: Trainer(model_from_config(TINY, splits, train)[0], splits, train, tmp / "out"), "in use")
    del first
    return verdict


# ------------------------------------------------------------------------------ data files
def write_schema_dataset(folder: Path, rows: int = 100, seed: int = 0, file: str = "d.csv", name: str = "d") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "schema.toml").write_text(
        f'name = "{name}"\nfiles = ["{file}"]\n[[columns]]\nname = "u"\nkind = "categorical"\n'
        '[[columns]]\nname = "i"\nkind = "categorical"\n[[columns]]\nname = "y"\nkind = "label"\n'
    )
    generator = torch.Generator().manual_seed(seed)
    frame = pl.DataFrame(
        {
            "u": [f"u{v}" for v in torch.randint(0, 9, (rows,), generator=generator).tolist()],
            "i": [f"i{v}" for v in torch.randint(0, 9, (rows,), generator=generator).tolist()],
            "y": [str(v) for v in torch.randint(0, 2, (rows,), generator=generator).tolist()],
        }
    )
    frame.write_csv(folder / file)
    return folder


def load(folder: Path, tmp: Path):
    from data import load_dataset

    return load_dataset(str(folder), cache_dir=tmp / "cache")


@case("data", "a file name with glob characters")
def _glob(tmp: Path) -> str:
    folder = write_schema_dataset(tmp / "d", file="d[1].csv", seed=0)
    write_schema_dataset(tmp / "d", file="d1.csv", seed=1)
    write_schema_dataset(tmp / "d", file="d[1].csv", seed=0)
    mine = pl.read_csv(folder / "d[1].csv", glob=False)["y"].cast(pl.Float32).mean()
    try:
        splits = load(folder, tmp)
    except Exception:
        return CRASH
    labels = torch.cat([splits.train.labels, splits.valid.labels, splits.test.labels])
    return CORRECT if abs(float(labels.mean()) - mine) < 1e-6 else SILENT


@case("data", "same file name, size and mtime in two folders")
def _cache_collision(tmp: Path) -> str:
    first = write_schema_dataset(tmp / "a", seed=0)
    second = write_schema_dataset(tmp / "b", seed=0)
    text = (first / "d.csv").read_text()
    (second / "d.csv").write_text(text.replace(",1\n", ",X\n").replace(",0\n", ",1\n").replace(",X\n", ",0\n"))
    for folder in (first, second):
        os.utime(folder / "d.csv", ns=(1, 1))
    a, b = load(first, tmp), load(second, tmp)
    return CORRECT if not torch.equal(a.train.labels, b.train.labels) else SILENT


@case("data", "a dataset name that climbs out of the cache")
def _escape(tmp: Path) -> str:
    folder = write_schema_dataset(tmp / "d", name="../../../escaped")
    try:
        load(folder, tmp / "deep" / "er")
    except Exception:
        return CRASH
    return SECURITY if list(tmp.glob("**/escaped-*")) and not list((tmp / "deep" / "er" / "cache" / "processed").glob("*escaped*")) else CORRECT


@case("data", "an empty data file")
def _empty_file(tmp: Path) -> str:
    folder = write_schema_dataset(tmp / "d")
    (folder / "d.csv").write_text("")
    return expect_error(lambda: load(folder, tmp), ("d.csv", "empty", "no data"))


@case("data", "a header-only data file, trained")
def _header_only(tmp: Path) -> str:
    folder = write_schema_dataset(tmp / "d")
    (folder / "d.csv").write_text("u,i,y\n")
    config = {**TINY, "data": {"name": str(folder), "cache_dir": str(tmp / "cache")}}
    return expect_error(lambda: run(config, tmp / "out"), ("empty", "no data"))


@case("data", "a data file too small for every split, trained")
def _empty_split(tmp: Path) -> str:
    folder = write_schema_dataset(tmp / "d", rows=4)
    config = {**TINY, "data": {"name": str(folder), "cache_dir": str(tmp / "cache")}}
    return expect_error(lambda: run(config, tmp / "out"), "split")


def _criteo_lines(rows: int = 20) -> str:
    return "".join(
        "\t".join([str(r % 2), *[str(r)] * 13, *[f"{r:08x}"] * 26]) + "\n" for r in range(rows)
    )


@case("data", "Criteo file ending with a blank line")
def _criteo_blank(tmp: Path) -> str:
    from data import load_criteo

    (tmp / "train.txt").write_text(_criteo_lines() + "\n")
    return _every_row_read(lambda: load_criteo(tmp / "train.txt", cache_dir=tmp / "cache"), 20)


@case("data", "Avazu file ending with a blank line")
def _avazu_blank(tmp: Path) -> str:
    from data import load_avazu
    from data.avazu import HEADER

    lines = [",".join(HEADER)] + [
        ",".join([str(r), str(r % 2), f"141021{r % 24:02d}", *[f"v{r % 3}"] * (len(HEADER) - 3)]) for r in range(20)
    ]
    (tmp / "train.csv").write_text("\n".join(lines) + "\n\n")
    return _every_row_read(lambda: load_avazu(tmp / "train.csv", cache_dir=tmp / "cache"), 20)


def _every_row_read(load: Callable[[], Any], rows: int) -> str:
    """CORRECT when `load()` returns splits holding `rows` rows in all, SILENT for another count,
    CRASH when it raises."""
    try:
        splits = load()
    except Exception:
        return CRASH
    return CORRECT if len(splits.train) + len(splits.valid) + len(splits.test) == rows else SILENT


@case("data", "invalid UTF-8 in a data file")
def _utf8(tmp: Path) -> str:
    folder = write_schema_dataset(tmp / "d")
    lines = (folder / "d.csv").read_bytes().splitlines(keepends=True)
    lines[5] = b"u\xff1" + lines[5][2:]
    (folder / "d.csv").write_bytes(b"".join(lines))
    return expect_error(lambda: load(folder, tmp), "line 6")


@case("data", "a blank line inside a data file")
def _blank_inside(tmp: Path) -> str:
    folder = write_schema_dataset(tmp / "d")
    lines = (folder / "d.csv").read_text().splitlines(keepends=True)
    (folder / "d.csv").write_text("".join(lines[:5] + ["\n"] + lines[5:]))
    return expect_error(lambda: load(folder, tmp), "line 6")


@case("data", "a Criteo line with a missing field")
def _criteo_fields(tmp: Path) -> str:
    from data import load_criteo

    lines = _criteo_lines().splitlines(keepends=True)
    lines[3] = lines[3].split("\t", 1)[1]
    (tmp / "train.txt").write_text("".join(lines))
    return expect_error(lambda: load_criteo(tmp / "train.txt", cache_dir=tmp / "cache"), "line 4")


def schema_case(replace: tuple[str, str], *words: str) -> Callable[[Path], str]:
    def attempt(tmp: Path) -> str:
        folder = write_schema_dataset(tmp / "d")
        schema = (folder / "schema.toml").read_text()
        (folder / "schema.toml").write_text(schema.replace(*replace, 1) if replace[0] else replace[1] + schema)
        return expect_error(lambda: load(folder, tmp), *words)

    return attempt


for _label, _replace, _word in [
    ("schema min_count = 1.5", ('kind = "categorical"\n', 'kind = "categorical"\nmin_count = 1.5\n'), "min_count"),
    ("schema min_count = '2'", ('kind = "categorical"\n', 'kind = "categorical"\nmin_count = "2"\n'), "min_count"),
    ("schema has_header = 'false'", ("", 'has_header = "false"\n'), "has_header"),
    ("schema seed = 'x'", ("", 'seed = "x"\n'), "seed"),
    ("schema seed = 1.5", ("", "seed = 1.5\n"), "seed"),
    ("schema split with a string", ("", 'split = [0.8, 0.1, "0.1"]\n'), "split"),
    ("schema unknown key", ("", "sperator = ';'\n"), "sperator"),
]:
    case("data", _label)(schema_case(_replace, _word))


@case("data", "two builders of one cache entry at once")
def _race(tmp: Path) -> str:
    folder = write_schema_dataset(tmp / "d")
    real_rename, real_replace, raced = os.rename, os.replace, []

    def racing(real):
        def move(source, destination):
            if not raced and ".tmp-" in str(source):
                raced.append(True)
                shutil.copytree(source, destination)
            real(source, destination)

        return move

    os.rename, os.replace = racing(real_rename), racing(real_replace)
    try:
        load(folder, tmp)
    except Exception:
        return CRASH
    finally:
        os.rename, os.replace = real_rename, real_replace
    return CORRECT


# ------------------------------------------------------------------------------ offload
ROWS, DIM = 1000, 4


@case("offload", "MmapStore.create over a trained store")
def _overwrite(tmp: Path) -> str:
    from embtab.offload import MmapStore

    path = tmp / "t.store"
    store = MmapStore.create(path, ROWS, DIM, 1)
    store.weights[:] = 7.0
    store.close()
    verdict = expect_error(lambda: MmapStore.create(path, ROWS, DIM, 1).close(), "exists")
    reopened = MmapStore.open(path, ROWS, DIM, 1)
    kept = bool(reopened.weights.eq(7.0).all())
    reopened.close()
    return verdict if kept else LOSS


def _changed_store(tmp: Path, change: str) -> str:
    from embtab.offload import MmapStore

    path = tmp / "t.store"
    store = MmapStore.create(path, ROWS, DIM, 1)
    if change == "delete":
        path.unlink()
    else:
        path.unlink()
        MmapStore.create(path, ROWS, DIM, 1).close()
    rows = torch.tensor([1, 2])
    try:
        store.write(rows, torch.full((2, DIM), 5.0), torch.ones(2, 1))
        store.close()
    except ORDINARY as error:
        return CLEAR if change in str(error) else CRASH
    except Exception:
        return CRASH
    return LOSS


case("offload", "store file deleted during training")(lambda tmp: _changed_store(tmp, "delete"))
case("offload", "store file replaced during training")(lambda tmp: _changed_store(tmp, "replace"))


def _read_truncated(path: str, queue) -> None:
    from embtab.offload import MmapStore

    store = MmapStore.create(path, ROWS, DIM, 1)
    os.truncate(path, 4096 + 64)
    try:
        store.read(torch.tensor([ROWS - 1]))
        queue.put(SILENT)
    except ORDINARY as error:
        queue.put(CLEAR if "truncated" in str(error) else CRASH)
    except Exception:
        queue.put(CRASH)


@case("offload", "store file truncated during training")
def _truncated(tmp: Path) -> str:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_read_truncated, args=(str(tmp / "t.store"), queue))
    process.start()
    process.join(120)
    return queue.get() if process.exitcode == 0 else CRASH  # killed by SIGBUS


def _offloaded_pair():
    import embtab
    from embtab.methods.offloaded import Offloaded
    from embtab.offload import RamStore, attach

    features = (embtab.FeatureSpec("user", 50), embtab.FeatureSpec("item", ROWS))
    torch.manual_seed(0)
    spec = embtab.EmbeddingSpec(features=features, dim=DIM, method=Offloaded(cache_rows=300, policy="lru"))
    dmp = embtab.fuse(embtab.EmbeddingTables(spec), embtab.SparseOptimizer("sgd", lr=0.1))
    return dmp, attach(dmp, {"user": RamStore.create(50, DIM, 0), "item": RamStore.create(ROWS, DIM, 0)})


def bad_id_case(value: int) -> Callable[[Path], str]:
    def attempt(tmp: Path) -> str:
        from torchrec import KeyedJaggedTensor

        from embtab.offload import Prefetcher

        dmp, offload = _offloaded_pair()
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["user", "item"], values=torch.tensor([3, value, 5, 6]), lengths=torch.tensor([1, 1, 1, 1])
        )
        verdict = expect_error(lambda: [dmp(batch) for batch in Prefetcher([kjt], offload)], "user", str(value))
        loaded = offload.stats()["offload_cache"].loaded_rows
        return SILENT if verdict == CLEAR and loaded else verdict

    return attempt


for _value in (50, -1, 10**9):
    case("offload", f"offloaded user id {_value} (50 ids)")(bad_id_case(_value))


@case("offload", "offload cache smaller than an evaluation batch")
def _eval_cache(tmp: Path) -> str:
    import embtab
    from data import make_synthetic
    from embtab.methods.offloaded import Offloaded
    from experiments.trainer import TrainConfig, Trainer
    from models import DLRM

    splits = make_synthetic(num_samples=3000, num_fields=3, cardinalities=400, dense_dim=2, seed=1)
    spec = embtab.EmbeddingSpec(features=splits.feature_specs(), dim=4, method=Offloaded(300, policy="lru"))
    model = DLRM(embtab.EmbeddingTables(spec), dense_dim=2, bottom_hidden=(8,), top_hidden=(8,))
    config = TrainConfig(epochs=1, batch_size=32, eval_batch_size=4096, progress=False)
    return expect_error(lambda: Trainer(model, splits, config, tmp / "out").fit(), "eval_batch_size")


def empty_batch_case(fused: bool) -> Callable[[Path], str]:
    def attempt(tmp: Path) -> str:
        import embtab
        from torchrec import KeyedJaggedTensor

        spec = embtab.EmbeddingSpec(features=(embtab.FeatureSpec("a", 50), embtab.FeatureSpec("b", 60)), dim=4)
        module = embtab.EmbeddingTables(spec)
        if fused:
            module = embtab.fuse(module, embtab.SparseOptimizer("sgd", lr=0.1))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["a", "b"], values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(0, dtype=torch.int64)
        )
        try:
            out = module(kjt)
        except ORDINARY as error:
            return CLEAR if "empty" in str(error) else CRASH
        except Exception:
            return CRASH
        return CORRECT if out.pooled.values().shape[0] == 0 else SILENT

    return attempt


case("offload", "an empty batch, fused")(empty_batch_case(True))
case("offload", "an empty batch, unfused")(empty_batch_case(False))


# ------------------------------------------------------------------------------ driver
def run_cases(selected: str | None) -> list[dict[str, str]]:
    rows = []
    for group, name, function in CASES:
        if selected and selected not in name:
            continue
        with tempfile.TemporaryDirectory(prefix="hostile-") as folder:
            try:
                verdict = function(Path(folder))
                detail = ""
            except Exception as error:  # the case's own set-up failed: the code under test did
                verdict, detail = CRASH, "".join(traceback.format_exception_only(error)).strip()[-300:]
        rows.append({"group": group, "case": name, "verdict": verdict, "detail": detail})
        print(f"{verdict:14s} {group:10s} {name}", flush=True)
    return rows


def main() -> None:
    from experiments.common import parser, write_json

    p = parser(__doc__.splitlines()[0], "results/hostile.json")
    p.add_argument("--cases", help="run only the cases whose name contains this text")
    args = p.parse_args()
    os.environ.setdefault("EMBTAB_DATA_DIR", tempfile.mkdtemp(prefix="hostile-data-"))
    rows = run_cases(args.cases)
    counts = Counter(r["verdict"] for r in rows)
    by_group = {g: dict(Counter(r["verdict"] for r in rows if r["group"] == g)) for g in dict.fromkeys(r["group"] for r in rows)}
    print(json.dumps({"cases": len(rows), "verdicts": dict(counts)}))
    write_json(args.out, {"cases": len(rows), "verdicts": dict(counts), "by_group": by_group, "rows": rows})


if __name__ == "__main__":
    main()
