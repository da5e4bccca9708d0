"""Reading a record's JSON fields, so that a field that is missing or of the wrong type is a
`Damage` naming it (`tasks.shard`) instead of a KeyError or a traceback far from the file."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Damage(Exception):
    """Where in a record the damage is (`tasks.shard`; empty: the record itself) and what it is."""

    def __init__(self, path: str, problem: str):
        super().__init__(path, problem)
        self.path, self.problem = path, problem


REQUIRED: Any = object()


def json_field(raw: Any, key: str, convert: Callable[[Any], T], default: Any = REQUIRED) -> T:
    """`raw[key]` through `convert` (`default` when absent, if given). A value `convert` cannot
    take (it raises a TypeError, ValueError, KeyError or AttributeError) is damage at `key`."""
    if not isinstance(raw, dict):
        raise Damage("", "is not a JSON object")
    if key not in raw:
        if default is REQUIRED:
            raise Damage(key, "is missing")
        return default
    try:
        return convert(raw[key])
    except Damage as inner:
        if not inner.path:  # an item that is not an object: the field holding it is wrong
            raise Damage(key, "has the wrong type") from None
        raise Damage(f"{key}.{inner.path}", inner.problem) from None
    except (TypeError, ValueError, KeyError, AttributeError):
        raise Damage(key, "has the wrong type") from None


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"not text: {value!r}")
    return value


def same(value: T) -> T:
    return value


def optional(convert: Callable[[Any], T]) -> Callable[[Any], T | None]:
    return lambda value: None if value is None else convert(value)


def list_of(convert: Callable[[Any], T]) -> Callable[[Any], list[T]]:
    def read(value: Any) -> list[T]:
        if not isinstance(value, list):
            raise TypeError(f"not a list: {value!r}")
        return [convert(item) for item in value]

    return read


def mapping(convert: Callable[[Any], T], null_is_empty: bool = False) -> Callable[[Any], dict]:
    def read(value: Any) -> dict[str, T]:
        if value is None and null_is_empty:
            return {}
        if not isinstance(value, dict):
            raise TypeError(f"not a JSON object: {value!r}")
        return {key: convert(item) for key, item in value.items()}

    return read
