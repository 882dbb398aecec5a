"""Checks of the input a model hands `EmbeddingTables`: keys, lengths, empty bags, id ranges.

Every error names the feature, the offending value and what was expected.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchrec import KeyedJaggedTensor

from embtab.config import FeatureSpec, LogicalTable


def canonical(
    kjt: KeyedJaggedTensor, order: list[str], features: dict[str, FeatureSpec], weighted: bool = False
) -> KeyedJaggedTensor:
    """`kjt` checked and with its keys in `order` (the tables' feature order).

    Raises:
        ValueError: an empty batch, an unknown or missing feature, lengths that do not match the
            values, non-integer ids, an empty bag of a feature that rejects them, or per-id
            weights present when not `weighted` (absent when `weighted`).
    """
    keys = kjt.keys()
    if kjt.lengths().numel() == 0:
        raise ValueError(f"empty batch: features {keys} hold 0 samples; expected at least one")
    if keys != order:
        unknown = [k for k in keys if k not in features]
        if unknown:
            raise ValueError(f"unknown feature {unknown[0]!r} in the input; expected features {order}")
        missing = [k for k in order if k not in keys]
        if missing:
            raise ValueError(f"feature {missing[0]!r} is missing from the input; expected features {order}")
    check_lengths(kjt, features)
    if (kjt.weights_or_none() is not None) != weighted:
        given = "with" if kjt.weights_or_none() is not None else "without"
        raise ValueError(f"ids came {given} weights, but the tables were built with weighted={weighted}")
    if keys != order:
        kjt = kjt.permute([keys.index(k) for k in order])
    return kjt


def check_lengths(kjt: KeyedJaggedTensor, features: dict[str, FeatureSpec]) -> None:
    values, lengths, keys = kjt.values(), kjt.lengths(), kjt.keys()
    if values.is_floating_point() or values.dtype == torch.bool:
        raise ValueError(f"ids must be integers, got values of dtype {values.dtype}")
    if lengths.numel() % len(keys):
        raise ValueError(
            f"{lengths.numel()} lengths cannot be split evenly over {len(keys)} features {keys}"
        )
    if lengths.numel() and int(lengths.min()) < 0:
        position = int(torch.argmin(lengths))
        raise ValueError(
            f"feature {keys[position // kjt.stride()]!r}: negative length {int(lengths.min())} "
            f"for sample {position % kjt.stride()}; expected lengths >= 0"
        )
    total = int(lengths.sum())
    if total != values.numel():
        raise ValueError(
            f"lengths add up to {total} ids but {values.numel()} values were given; expected equal"
        )
    check_empty_bags(lengths.view(len(keys), -1), [features[k] for k in keys])


def check_empty_bags(lengths: torch.Tensor, features: Sequence[FeatureSpec]) -> None:
    """No empty bag (`lengths` ``[features, batch]`` of 0) for a feature that rejects them."""
    rejecting = [i for i, f in enumerate(features) if f.rejects_empty]
    if not rejecting or lengths.shape[1] == 0:
        return
    empty = lengths[rejecting] == 0
    if bool(empty.any()):
        row, sample = (int(x) for x in torch.nonzero(empty)[0])
        feature = features[rejecting[row]]
        reason = "mean pooling" if feature.pooling == "mean" else "required=True"
        raise ValueError(
            f"feature {feature.name!r}: sample {sample} has an empty bag; expected at least one id "
            f"({reason})"
        )


def check_ids(table: LogicalTable, ids: torch.Tensor, sizes: list[int], max_id: int | None) -> None:
    """Every id of `table`'s features (`sizes` ids per feature) in ``0 <= id < max_id``
    (``max_id`` None: any non-negative id)."""
    if ids.numel() == 0:
        return
    low, high = torch.aminmax(ids)
    if int(low) >= 0 and (max_id is None or int(high) < max_id):
        return
    bad = (ids < 0) if max_id is None else (ids < 0) | (ids >= max_id)
    position = int(torch.nonzero(bad)[0])
    feature = table.features[int(torch.searchsorted(torch.tensor(sizes).cumsum(0), position, right=True))]
    expected = "0 <= id" if max_id is None else f"0 <= id < {max_id}"
    raise ValueError(
        f"feature {feature.name!r}: id {int(ids[position])} is out of range; expected {expected}"
    )
