"""Checkpoints: a fused model's training state, and files that say what they belong to.

Two layers:

- `training_state` / `load_training_state`: a `DistributedModelParallel`'s weights and fused
  optimizer state as whole plain tensors, independent of the sharding (saved by any number of
  ranks, loadable into any number).
- `save_checkpoint` / `load_checkpoint`: a file holding a payload (plain tensors, numbers,
  strings, lists, dicts), the *identity* of what it belongs to (embedding spec, model, training
  configuration, data fingerprint: any JSON data) and a SHA-256 checksum of the payload. Loading
  verifies the checksum (a damaged file is named, with what to do), refuses an identity that
  differs in any field not declared safe to change (naming the field and both values), and
  unpickles with ``torch.load(weights_only=True)``, so a planted file cannot run code.

File layout: the line ``EMBTAB-CHECKPOINT <version>``, a line of JSON (identity, checksum, payload
length), then the payload as written by `torch.save`. Files are written with
`embtab.files.atomic_write`.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel

from embtab.files import atomic_write
from embtab.fused_state import sparse_optimizer_state
from embtab.quiet import quiet_torchrec
from embtab.shard import gathered, shard_window, union_sizes

MAGIC = b"EMBTAB-CHECKPOINT"
VERSION = 1
WHAT_TO_DO = (
    "Restore it from a copy, or start over: delete it and the checkpoints written with it "
    "(or use a fresh output folder)"
)


class CheckpointError(ValueError):
    """A checkpoint file is damaged, not a checkpoint, or belongs to another run."""


# ------------------------------------------------------------------------------ files
def save_checkpoint(path: str | Path, payload: Mapping[str, Any], identity: Mapping[str, Any]) -> Path:
    """Write `payload` with its `identity` and checksum to `path`, atomically."""
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    body = buffer.getvalue()
    header = {
        "identity": normalized(identity),
        "sha256": hashlib.sha256(body).hexdigest(),
        "payload_bytes": len(body),
    }
    first = MAGIC + b" " + str(VERSION).encode() + b"\n"

    def write(file) -> None:
        file.write(first)
        file.write(json.dumps(header, sort_keys=True).encode() + b"\n")
        file.write(body)

    return atomic_write(path, write)


def load_checkpoint(
    path: str | Path, identity: Mapping[str, Any] | None = None, safe_to_change: Iterable[str] = ()
) -> dict[str, Any]:
    """The payload saved at `path`, after checking its checksum and (when given) that its saved
    identity equals `identity` in every field except those in `safe_to_change` (dotted names,
    e.g. ``"train.epochs"``; a name also covers the fields below it)."""
    path = Path(path)
    header, body = _read(path)
    if hashlib.sha256(body).hexdigest() != header.get("sha256") or len(body) != header.get("payload_bytes"):
        raise CheckpointError(
            f"checkpoint {path} is damaged: its contents do not match the checksum written with it "
            f"({len(body)} of {header.get('payload_bytes')} payload bytes). {WHAT_TO_DO}"
        )
    if identity is not None:
        check_identity(header.get("identity", {}), identity, path, safe_to_change)
    try:
        return torch.load(io.BytesIO(body), weights_only=True)
    except Exception as err:  # weights_only refuses anything but plain data
        raise CheckpointError(f"checkpoint {path} holds data that is not plain tensors and values: {err}") from err


def read_identity(path: str | Path) -> dict[str, Any]:
    """The identity saved in the checkpoint at `path` (checksum not checked)."""
    return _read(Path(path))[0].get("identity", {})


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    first, _, rest = data.partition(b"\n")
    if not first.startswith(MAGIC + b" "):
        raise CheckpointError(
            f"{path} is not an embtab checkpoint (no {MAGIC.decode()} header); remove it or choose "
            "another output folder"
        )
    if first != MAGIC + b" " + str(VERSION).encode():
        raise CheckpointError(f"{path}: checkpoint format {first.decode(errors='replace')!r}, expected version {VERSION}")
    line, _, body = rest.partition(b"\n")
    try:
        header = json.loads(line)
    except ValueError:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its header is not readable. {WHAT_TO_DO}"
        ) from None
    return header, body


def normalized(identity: Mapping[str, Any]) -> dict[str, Any]:
    """`identity` as JSON data (tuples become lists, other objects their `str`)."""
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths to every leaf of nested dicts and lists (list items by index)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if not items or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_identity(
    saved: Mapping[str, Any], current: Mapping[str, Any], path: Path, safe_to_change: Iterable[str] = ()
) -> None:
    """Raise `CheckpointError` naming every field where `saved` and `current` differ (fields in
    `safe_to_change`, or below one, excepted)."""
    old, new = flatten(normalized(saved)), flatten(normalized(current))
    safe = tuple(safe_to_change)
    differ = [
        key
        for key in sorted(set(old) | set(new))
        if old.get(key, "<absent>") != new.get(key, "<absent>")
        and not any(key == s or key.startswith(s + ".") for s in safe)
    ]
    if differ:
        details = "; ".join(f"{k}: checkpoint {old.get(k, '<absent>')!r}, this run {new.get(k, '<absent>')!r}" for k in differ[:6])
        raise CheckpointError(
            f"checkpoint {path} belongs to another run: {details}"
            f"{' ...' if len(differ) > 6 else ''}. Use another output folder, or restore the "
            f"checkpoint's settings to continue it (safe to change: {list(safe) or 'none'})"
        )


# ------------------------------------------------------------------------------ fused state
def _column_shards(key: str, numel: int, rows: dict[str, int]) -> int:
    """How many column shards keep their own copy of a row-wise optimizer state: torchrec stores
    row-wise Adagrad's one float per row once per column shard, concatenated."""
    table_rows = rows.get(key.split("/")[0])
    return numel // table_rows if table_rows and numel % table_rows == 0 else 1


def training_state(dmp: DistributedModelParallel) -> dict[str, dict[str, torch.Tensor]]:
    """Weights and fused optimizer state as whole plain tensors, for `torch.save`.

    Sharded tables are gathered, so every rank must call this; rank 0 receives the state (other
    ranks an empty one). The layout does not depend on the sharding: a row-wise optimizer state
    kept per column shard is saved as its mean over the shards (its value for the whole row), so a
    checkpoint loads into any number of ranks and any plan.
    """
    with quiet_torchrec():
        return _training_state(dmp)


def _training_state(dmp: DistributedModelParallel) -> dict[str, dict[str, torch.Tensor]]:
    group = dmp._env.process_group
    model = gathered(dmp.state_dict(), group)
    sparse = gathered(sparse_optimizer_state(dmp), group)
    if model is None or sparse is None:
        return {"model": {}, "sparse_optimizer": {}}
    rows = {k: v.size(0) for k, v in model.items() if v.dim() == 2}
    for key, value in sparse.items():
        shards = _column_shards(key, value.numel(), rows) if value.dim() == 1 else 1
        sparse[key] = value.view(shards, -1).mean(0) if shards > 1 else value
    return {"model": model, "sparse_optimizer": sparse}


def load_training_state(dmp: DistributedModelParallel, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Restore a `training_state` (saved by any number of ranks) into this model, in place: each
    rank copies the parts of the whole tensors that its shards hold. Every rank must call it.

    Every key and shape is checked before anything is copied: a mismatched checkpoint changes nothing.
    """
    with quiet_torchrec():
        _load_training_state(dmp, state)


def _load_training_state(dmp: DistributedModelParallel, state: dict[str, dict[str, torch.Tensor]]) -> None:
    group = dmp._env.process_group
    weights, sparse = dmp.state_dict(), sparse_optimizer_state(dmp)
    sparse_sizes = union_sizes(sparse, group)
    rows = {k: v.size(0) for k, v in weights.items() if isinstance(v, ShardedTensor)}
    sparse_saved = {
        k: v.repeat(_column_shards(k, sparse_sizes[k][0], rows)) if len(sparse_sizes.get(k, ())) == 1 else v
        for k, v in state["sparse_optimizer"].items()
    }
    _check_matches({k: tuple(v.size()) for k, v in weights.items()}, state["model"], "weights")
    _check_matches(sparse_sizes, sparse_saved, "sparse optimizer state")
    with torch.no_grad():
        for targets, saved in ((weights, state["model"]), (sparse, sparse_saved)):
            for key, target in targets.items():
                _copy_into(target, saved[key])


def _copy_into(target: torch.Tensor, whole: torch.Tensor) -> None:
    if isinstance(target, ShardedTensor):
        for shard in target.local_shards():
            shard.tensor.copy_(whole[shard_window(shard.metadata)])
    else:
        target.copy_(whole)


def _check_matches(sizes: dict[str, tuple[int, ...]], saved: dict[str, torch.Tensor], what: str) -> None:
    """`saved` must have exactly the keys and whole shapes of the model's tensors."""
    if set(sizes) != set(saved):
        missing, unexpected = sorted(set(sizes) - set(saved)), sorted(set(saved) - set(sizes))
        raise ValueError(
            f"checkpoint does not match the model's {what}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in saved.items():
        if tuple(value.shape) != sizes[key]:
            raise ValueError(
                f"checkpoint entry {key!r} has shape {tuple(value.shape)}; the model expects {sizes[key]}"
            )
