"""Type checks of configuration values at the boundary, before they reach torch, numpy or polars.

Python dataclasses do not check their fields' types, and TOML or ``--set`` values arrive as
whatever the user wrote: ``dim = 12.9`` would be truncated, ``has_header = "false"`` would be
true. `check_field_types` checks every field of a dataclass instance against its annotation and
raises a ValueError naming the field, the value and the expected type.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import types
import typing
from typing import Any, Literal, Union

_SIMPLE = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def is_integer(value: object) -> bool:
    """Whether `value` is an int (a bool, though an int subclass, is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_integer(value: object, minimum: int, what: str) -> int:
    """`value` as an int >= `minimum`; else a ValueError ``"{what} must be an integer >= ..., got ..."``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")


def check_int(table: str, field: str, value: object, minimum: int) -> int:
    """A method parameter `field` of `table` as an int >= `minimum` (the message names both)."""
    return check_integer(value, minimum, f"table {table!r}: {field}")


def is_instance(value: Any, kind: Any) -> bool:
    """Whether `value` is a valid value of the annotation `kind` (bool is not an int, an int is
    a float; tuples also accept lists; unknown annotations accept anything)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return is_integer(value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if origin in (Union, types.UnionType):
        return any(is_instance(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin is collections.abc.Sequence and args:
        return isinstance(value, (tuple, list)) and all(is_instance(v, args[0]) for v in value)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(is_instance(v, args[0]) for v in value)
        return len(args) == len(value) and all(is_instance(v, a) for v, a in zip(value, args))
    return True


def describe(kind: Any) -> str:
    """A reader's name of the annotation `kind`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind in _SIMPLE:
        return _SIMPLE[kind]
    if kind is type(None):
        return "none"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is collections.abc.Sequence and args:
        return f"a list of {describe(args[0])}s"
    if origin is tuple:
        inner = describe(args[0]) if args else "values"
        return f"a list of {inner}s" if len(args) == 2 and args[1] is Ellipsis else f"a list of {len(args)} values"
    return str(kind)


def check_field_types(instance: Any, where: str) -> None:
    """Raise ValueError at the first field of the dataclass `instance` whose value does not match
    its annotation, or is a float that is not finite; `where` names the instance in the message."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value, kind = getattr(instance, field.name), hints.get(field.name, Any)
        if not is_instance(value, kind):
            raise ValueError(f"{where}: {field.name} = {value!r}, expected {describe(kind)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: {field.name} = {value!r}, expected a finite number")


def check_keys(table: Any, known: typing.Iterable[str], where: str) -> None:
    """Raise ValueError unless `table` is a mapping whose keys all lie in `known`."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table of settings, got {table!r}")
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")


def check_call(function: Any, kwargs: typing.Mapping[str, Any], where: str) -> None:
    """Raise ValueError unless `function` (or a class's constructor) takes every keyword of
    `kwargs` with a value of the annotated type; the message names the key."""
    target = function.__init__ if inspect.isclass(function) else function
    parameters = inspect.signature(target).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        known = [
            n for n, p in parameters.items()
            if n != "self" and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        check_keys(dict(kwargs), known, where)
    try:
        hints = typing.get_type_hints(target)
    except (NameError, TypeError):  # annotations that do not resolve are not checked
        hints = {}
    for key, value in kwargs.items():
        if key in hints and not is_instance(value, hints[key]):
            raise ValueError(f"{where}: {key} = {value!r}, expected {describe(hints[key])}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: {key} = {value!r}, expected a finite number")
