"""The one registry of embedding methods: registry key -> spec class, with the kind of each method.

A method file registers its spec class where it defines it::

    @register_method(MethodKind.COMPRESSION)
    @dataclass(frozen=True)
    class HashingTrick(SizedSpec): ...

and `embtab.methods` imports every method file once. This module imports no method (nor anything
else of embtab), so configuration (`embtab.config`) can resolve method names without an import
circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar

if TYPE_CHECKING:
    from embtab.config import MethodSpec

Spec = TypeVar("Spec", bound="type[MethodSpec]")


class MethodKind(str, Enum):
    """What a method is for, which decides where the library and the experiments offer it."""

    COMPRESSION = "compression"  # fewer bytes for any table; every generic budget and sweep takes it
    LEARNED_SIZE = "learned_size"  # trained with a mask; its exported size is learned (embtab.search)
    SEARCH_RESULT = "search_result"  # an architecture a search produces (per-field widths, pruned export)
    EXPORT_COMPRESSED = "export_compressed"  # trains full tables; compressed in its export (DPQ codes)
    PLACEMENT = "placement"  # not compression: where a full table's rows live (offloading)


@dataclass(frozen=True)
class Registration:
    spec: type
    kind: MethodKind


_REGISTRY: dict[str, Registration] = {}


def _kind(kind: MethodKind | str) -> MethodKind:
    known = [k.value for k in MethodKind]
    if kind not in known:
        raise ValueError(f"unknown method kind {kind!r}; expected one of {known}")
    return MethodKind(kind)


def register_method(kind: MethodKind | str) -> Callable[[Spec], Spec]:
    """Class decorator: register a `MethodSpec` subclass under its ``name`` with `kind`."""
    method_kind = _kind(kind)

    def register(spec: Spec) -> Spec:
        name = spec.name
        if not name:
            raise ValueError(f"{spec.__name__} has no registry key; expected a non-empty class attribute `name`")
        seen = _REGISTRY.get(name)
        if seen is not None and seen.spec is not spec:
            raise ValueError(f"method name {name!r} is already registered by {seen.spec.__name__}")
        _REGISTRY[name] = Registration(spec, method_kind)
        return spec

    return register


def unregister_method(name: str) -> None:
    """Remove a registration (a method defined for a test or a notebook session)."""
    method_class(name)
    del _REGISTRY[name]


def method_class(name: str) -> "type[MethodSpec]":
    """The spec class registered as `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown embedding method {name!r}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[name].spec


def kind_of(name: str) -> MethodKind:
    method_class(name)
    return _REGISTRY[name].kind


def methods_of_kind(*kinds: MethodKind | str) -> "dict[str, type[MethodSpec]]":
    """Registered spec classes of the given kinds (all when none is given), in registration order."""
    wanted = {_kind(k) for k in kinds} or set(MethodKind)
    return {name: r.spec for name, r in _REGISTRY.items() if r.kind in wanted}


def method_from_dict(data: Mapping[str, Any]) -> "MethodSpec":
    """Build a method spec from ``{"name": <registry key>, **parameters}`` (e.g. a TOML table)."""
    params = dict(data)
    name = params.pop("name", None)
    if name not in _REGISTRY:
        raise ValueError(f"unknown embedding method {name!r}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[name].spec(**params)
