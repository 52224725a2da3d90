"""JSON state for the pure control layer: dataclasses to JSON types and back, strictly.

The control modules keep their state in dataclasses that the agent persists between cycles
(``to_dict`` before switching, ``from_dict`` after a restart). :class:`Json` gives a
dataclass both: ``to_dict`` returns JSON types only (dates as ISO strings, tuples as lists,
dict keys as strings); ``from_dict`` is strict (unknown fields, missing ones and wrong types
raise ``ValueError`` naming the field; the constructor's own validation runs too). A field
typed ``Any`` is taken as it is (free-form JSON).

Standard library only.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from datetime import date
from typing import Any, Self, get_args, get_origin, get_type_hints

__all__ = ["Json", "decode", "decode_dataclass", "encode"]

_SCALARS = (str, int, float, bool, type(None))
_FIELDS: dict[type, tuple[str, ...]] = {}  # a dataclass's field names (encode runs every cycle)


def encode(value: Any) -> Any:
    cls = type(value)
    if cls in _SCALARS:
        return value
    names = _FIELDS.get(cls)
    if names is None and is_dataclass(value) and not isinstance(value, type):
        names = _FIELDS[cls] = tuple(f.name for f in fields(value))
    if names is not None:
        return {n: encode(getattr(value, n)) for n in names}
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    return value


def decode(tp: Any, value: Any, where: str) -> Any:
    if tp is Any:  # free-form JSON (a command's parameters, a record body): taken as it is
        return value
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{where}: must not be null")
        return decode(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple or origin is list:
        args = get_args(tp)
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            out = [decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
            return out if origin is list else tuple(out)
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        key_t, val_t = get_args(tp)
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected an object, got {value!r}")
        out_d = {}
        for k, v in value.items():
            key = k
            if key_t is int and isinstance(k, str):
                try:
                    key = int(k)
                except ValueError:
                    raise ValueError(f"{where}: key {k!r} is not an integer") from None
            out_d[decode(key_t, key, f"{where} key")] = decode(val_t, v, f"{where}[{k}]")
        return out_d
    if isinstance(tp, type) and is_dataclass(tp):
        return decode_dataclass(tp, value, where)
    if tp is date:
        if isinstance(value, str):
            try:
                return date.fromisoformat(value)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected a date YYYY-MM-DD, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"{where}: unsupported type {tp!r}")  # a bug here, not bad input


def decode_dataclass(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected an object, got {value!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}")
    kwargs = {k: decode(hints[k], v, f"{where}.{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ValueError(f"{where}: {exc}") from None


class Json:
    """``to_dict`` (JSON types) and ``from_dict`` (strict: unknown fields and wrong types raise
    ``ValueError`` naming the field; the constructor's validation runs too)."""

    def to_dict(self) -> dict[str, Any]:
        return typing.cast(dict[str, Any], encode(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return typing.cast(Self, decode_dataclass(cls, data, cls.__name__))
