"""Every method file, imported once so that each registers itself (`embtab.registry`).

Adding a method is adding its file (which registers its spec with `register_method`) and its
import line here. `METHODS`, `SEARCH_METHODS` and `PLACEMENT_METHODS` are views of the registry
by kind, taken when this package is imported.
"""

from __future__ import annotations

from embtab.config import MethodSpec
from embtab.methods.base import PhysicalTable, TableMethod
from embtab.methods.full import FullTable
from embtab.methods.hashing_trick import HashingTrick
from embtab.methods.multi_hash import MultiHash
from embtab.methods.qr import QREmbedding
from embtab.methods.multiplex import Multiplexed
from embtab.methods.managed_collision import ManagedCollision
from embtab.methods.optembed import OptEmbed
from embtab.methods.pep import PEP
from embtab.methods.mde import MDE
from embtab.methods.pruned import PrunedTable
from embtab.methods.dnis import DNIS
from embtab.methods.offloaded import Offloaded
from embtab.methods.tt_rec import TTRec
from embtab.methods.robe import ROBE
from embtab.methods.dhe import DHE
from embtab.methods.dpq import DPQ
from embtab.methods.mgqe import MGQE
from embtab.methods.deeplight import DeepLight
from embtab.methods.dedup import Dedup
from embtab.methods.autosrh import AutoSrh
from embtab.methods.autodim import AutoDim
from embtab.registry import MethodKind, method_from_dict, methods_of_kind, register_method

# Compression methods: every generic budget test and sweep takes them.
METHODS: dict[str, type[MethodSpec]] = methods_of_kind(MethodKind.COMPRESSION)

# Methods whose size is learned (embtab.search), only reachable from a search (the pruned export),
# or reached at export (DPQ, MGQE: a full table and a codebook train; codes + codebook are served):
# they do not take every budget the generic budget tests and sweeps ask of METHODS.
SEARCH_METHODS: dict[str, type[MethodSpec]] = methods_of_kind(
    MethodKind.LEARNED_SIZE, MethodKind.SEARCH_RESULT, MethodKind.EXPORT_COMPRESSED
)

# Not compression: where a full table's rows live (a fused cache in front of a RAM or mmap store).
PLACEMENT_METHODS: dict[str, type[MethodSpec]] = methods_of_kind(MethodKind.PLACEMENT)

__all__ = [
    "DHE",
    "DeepLight",
    "Dedup",
    "AutoSrh",
    "AutoDim",
    "DNIS",
    "DPQ",
    "MGQE",
    "ROBE",
    "TTRec",
    "MDE",
    "METHODS",
    "PEP",
    "PLACEMENT_METHODS",
    "SEARCH_METHODS",
    "FullTable",
    "HashingTrick",
    "ManagedCollision",
    "MethodKind",
    "MethodSpec",
    "MultiHash",
    "Multiplexed",
    "Offloaded",
    "OptEmbed",
    "PhysicalTable",
    "PrunedTable",
    "QREmbedding",
    "TableMethod",
    "method_from_dict",
    "register_method",
]
