"""The registry of compression methods: one line per method file."""

from __future__ import annotations

from typing import Any, Mapping

from embtab.config import MethodSpec
from embtab.methods.base import PhysicalTable, TableMethod
from embtab.methods.dhe import DHE
from embtab.methods.dnis import DNIS
from embtab.methods.dpq import DPQ
from embtab.methods.full import FullTable
from embtab.methods.hashing_trick import HashingTrick
from embtab.methods.managed_collision import ManagedCollision
from embtab.methods.mde import MDE
from embtab.methods.mgqe import MGQE
from embtab.methods.multi_hash import MultiHash
from embtab.methods.multiplex import Multiplexed
from embtab.methods.offloaded import Offloaded
from embtab.methods.optembed import OptEmbed
from embtab.methods.pep import PEP
from embtab.methods.pruned import PrunedTable
from embtab.methods.qr import QREmbedding
from embtab.methods.robe import ROBE
from embtab.methods.tt_rec import TTRec

METHODS: dict[str, type[MethodSpec]] = {
    FullTable.name: FullTable,
    HashingTrick.name: HashingTrick,
    MultiHash.name: MultiHash,
    QREmbedding.name: QREmbedding,
    Multiplexed.name: Multiplexed,
    ManagedCollision.name: ManagedCollision,
    TTRec.name: TTRec,
    ROBE.name: ROBE,
    DHE.name: DHE,
}

# Methods whose size is learned (embtab.search) or only reachable from a search (the pruned export),
# or that train a full table and shrink only at export (DPQ, MGQE: codes + codebook): they do not
# take every budget the generic budget tests and sweeps ask of METHODS.
SEARCH_METHODS: dict[str, type[MethodSpec]] = {
    OptEmbed.name: OptEmbed,
    PEP.name: PEP,
    MDE.name: MDE,
    PrunedTable.name: PrunedTable,
    DNIS.name: DNIS,
    DPQ.name: DPQ,
    MGQE.name: MGQE,
}

# Not compression: where a full table's rows live (a fused cache in front of a RAM or mmap store).
PLACEMENT_METHODS: dict[str, type[MethodSpec]] = {
    Offloaded.name: Offloaded,
}


def method_from_dict(data: Mapping[str, Any]) -> MethodSpec:
    """Build a method spec from ``{"name": <registry key>, **parameters}`` (e.g. a TOML table)."""
    params = dict(data)
    name = params.pop("name", None)
    known = {**METHODS, **SEARCH_METHODS, **PLACEMENT_METHODS}
    if name not in known:
        raise ValueError(f"unknown embedding method {name!r}; expected one of {sorted(known)}")
    return known[name](**params)


__all__ = ["METHODS", "SEARCH_METHODS", "PLACEMENT_METHODS", "MethodSpec", "PhysicalTable", "TableMethod", "FullTable", "method_from_dict"]
