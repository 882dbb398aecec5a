"""The registry of compression methods: one line per method file."""

from __future__ import annotations

from typing import Any, Mapping

from embtab.config import MethodSpec
from embtab.methods.base import PhysicalTable, TableMethod
from embtab.methods.full import FullTable
from embtab.methods.hashing_trick import HashingTrick
from embtab.methods.managed_collision import ManagedCollision
from embtab.methods.multi_hash import MultiHash
from embtab.methods.multiplex import Multiplexed
from embtab.methods.qr import QREmbedding

METHODS: dict[str, type[MethodSpec]] = {
    FullTable.name: FullTable,
    HashingTrick.name: HashingTrick,
    MultiHash.name: MultiHash,
    QREmbedding.name: QREmbedding,
    Multiplexed.name: Multiplexed,
    ManagedCollision.name: ManagedCollision,
}


def method_from_dict(data: Mapping[str, Any]) -> MethodSpec:
    """Build a method spec from ``{"name": <registry key>, **parameters}`` (e.g. a TOML table)."""
    params = dict(data)
    name = params.pop("name", None)
    if name not in METHODS:
        raise ValueError(f"unknown embedding method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](**params)


__all__ = ["METHODS", "MethodSpec", "PhysicalTable", "TableMethod", "FullTable", "method_from_dict"]
